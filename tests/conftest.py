"""Fixtures: a real nats-server (and redis-server) on free ports, roombus services as processes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.support import client as ws_client
from tests.support.cluster import NatsCluster, start_cluster
from tests.support.procs import NatsServer, RedisServer, ServiceProc


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One JetStream-enabled nats-server for the session; tests use unique rooms."""
    server = NatsServer(store_dir=tmp_path_factory.mktemp("nats-session")).start()
    yield server
    server.stop()


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test's own, for tests that restart it or need clean JetStream."""
    server = NatsServer(store_dir=tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three nats-server nodes forming a JetStream cluster, meta leader elected."""
    cluster = start_cluster(tmp_path / "cluster")
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir=tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def room() -> str:
    """A room name no other test uses."""
    return "r" + uuid.uuid4().hex[:12]


ServiceFactory = Callable[..., ServiceProc]


@pytest.fixture
def services(tmp_path: Path) -> Iterator[ServiceFactory]:
    """Start ``roombus <service>`` processes; every one is stopped after the test.

    ``services("gateway", nats)`` starts a gateway on a free port against that server;
    keyword arguments become environment settings (``MAX_ROOMS=2``). Messages reach clients
    only once stored, so the first gateway of a test on a server also starts a history
    service there, unless ``history=False`` (or the test started one itself).
    """
    started: list[ServiceProc] = []
    with_history: set[str] = set()

    def start(
        service: str,
        nats: NatsServer | NatsCluster | str,
        *args: str,
        wait: bool = True,
        history: bool = True,
        **env: object,
    ) -> ServiceProc:
        url = nats if isinstance(nats, str) else nats.url
        if service == "history":
            with_history.add(url)
        elif service == "gateway" and history and url not in with_history:
            start("history", nats, EPHEMERAL_ROOMS=str(env.get("EPHEMERAL_ROOMS", "")))
        # Tests blast hundreds of frames a second; the rate-limit tests set their own. Most
        # run with ROOMBUS_AUTH=none and exchange DMs (the tests of the default set it false).
        defaults = (
            {
                "RATE_LIMIT": "100000",
                "RATE_BURST": "100000",
                "HISTORY_RATE": "100000",
                "HISTORY_BURST": "100000",
                "INSECURE_DMS": "true",
            }
            if service == "gateway"
            else {}
        )
        proc = ServiceProc(
            service,
            env={
                "NATS_URL": url,
                "LOG_LEVEL": "info",
                **defaults,
                **{k: str(v) for k, v in env.items()},
            },
            logdir=tmp_path / "logs",
            args=list(args),
        )
        started.append(proc)
        return proc.start(wait_ready=wait)

    yield start
    for proc in started:
        if proc.alive():
            proc.kill()


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    await ws_client.close_all()
