"""Storage limits: every bound must fit in JetStream's storage, and a full store says so."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError

from tests.conftest import ServiceFactory
from tests.support.procs import NatsServer, ServiceProc, wait_for

MAX_FILE_STORE = 1024 * 1024


@pytest.fixture
def small_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server whose JetStream may use 1 MiB of disk (``max_file_store``)."""
    conf = tmp_path / "small.conf"
    conf.write_text(f"jetstream {{ max_file_store: {MAX_FILE_STORE} }}\n")
    server = NatsServer(store_dir=tmp_path / "nats", config_file=conf).start()
    yield server
    server.stop()


@pytest.fixture
def small_account(tmp_path: Path) -> Iterator[str]:
    """The URL of an account whose JetStream may use 1 MiB (``max_file``) on a large server."""
    conf = tmp_path / "account.conf"
    conf.write_text(
        f"accounts {{ APP: {{ jetstream: {{ max_file: {MAX_FILE_STORE}, max_mem: -1 }},"
        " users: [{ user: app, password: app }] } }\n"
    )
    server = NatsServer(store_dir=tmp_path / "nats", config_file=conf).start()
    yield f"nats://app:app@{server.host}:{server.port}"
    server.stop()


def exits_naming(proc: ServiceProc, setting: str) -> float:
    """Wait for ``proc`` to fail at start; its log must name ``setting``. Returns seconds."""
    started = time.monotonic()
    assert proc.proc is not None
    wait_for(lambda: proc.proc is not None and proc.proc.poll() is not None, 30, "the exit")
    assert proc.proc.returncode != 0
    log = proc.log()
    assert setting in log, log
    assert "_REPLICAS" not in log, log  # not the replica advice: the bound is what is wrong
    return time.monotonic() - started


def test_bounds_over_the_servers_max_file_store_stop_the_service_naming_the_setting(
    small_nats: NatsServer, services: ServiceFactory
) -> None:
    took = exits_naming(services("history", small_nats, wait=False), "HISTORY_MAX_BYTES")
    print(f"history with the default HISTORY_MAX_BYTES exited after {took:.2f}s")
    h = services("history", small_nats, HISTORY_MAX_BYTES=300_000)
    assert h.ready()

    exits_naming(services("presence", small_nats, wait=False), "PRESENCE_MAX_BYTES")
    # 300,000 for HISTORY + 2 x 200,000 for the presence buckets fit in 1 MiB.
    p = services("presence", small_nats, PRESENCE_MAX_BYTES=200_000)
    assert p.ready()


def test_bounds_over_the_accounts_storage_limit_stop_the_service_naming_the_setting(
    small_account: str, services: ServiceFactory
) -> None:
    h = services("history", small_account, wait=False)
    exits_naming(h, "HISTORY_MAX_BYTES")
    assert "over the account's JetStream storage (1 MiB" in h.log()
    assert services("history", small_account, HISTORY_MAX_BYTES=300_000).ready()
    exits_naming(services("presence", small_account, wait=False), "PRESENCE_MAX_BYTES")
    assert services("presence", small_account, PRESENCE_MAX_BYTES=200_000).ready()
    # A gateway keeps the bound the presence service gave the bucket (its default would not fit).
    assert services("gateway", small_account).ready()


async def test_a_full_store_is_counted_and_logged_and_acks_resume_once_space_is_freed(
    small_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    h = services("history", small_nats, HISTORY_MAX_BYTES=300_000)
    nc = await nats.connect(small_nats.url)
    js = nc.jetstream()
    # Something outside roombus's reserved bounds fills the rest of the store.
    await js.add_stream(StreamConfig(name="FILLER", subjects=["filler"], storage=StorageType.FILE))
    for _ in range(MAX_FILE_STORE // 1000 + 100):
        try:
            await js.publish("filler", b"x" * 1000, timeout=2)
        except APIError:
            break
    else:
        raise AssertionError("the filler never filled the store")

    msg = json.dumps({"user": "ops", "text": "while full"}).encode()
    # Told at once (the history service's error reply), not after the sender's retries.
    asked = time.monotonic()
    reply = await nc.request(f"room.{room}.message", msg, timeout=5)
    refused = json.loads(reply.data)["error"]
    print(f"store full: refused in {time.monotonic() - asked:.3f}s: {refused}")
    assert refused["code"] == "not_stored"
    labels = 'asset="HISTORY",reason="server"'
    wait_for(lambda: h.metric("roombus_jetstream_storage_refused_total", labels) >= 1, 10, "count")
    assert "JetStream refused a write: no space" in h.log()
    assert "store is full" in h.log()

    await js.delete_stream("FILLER")
    freed = time.monotonic()
    deadline = freed + 10
    while True:
        try:
            reply = await nc.request(f"room.{room}.message", msg, timeout=2)
            if b'"error"' not in reply.data:
                break
        except NatsTimeoutError:
            pass
        assert time.monotonic() < deadline, "acks did not resume"
    assert json.loads(reply.data)["seq"] >= 1
    print(f"acks resumed {time.monotonic() - freed:.2f}s after the space was freed")
    await nc.close()
