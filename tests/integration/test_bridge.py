"""The Redis bridge: real redis-server, nats-server, bridge and gateway processes.

Where a test mimics a person it uses ``redis-cli``; a Redis-era server subscribed to a room
is a redis.asyncio ``SUBSCRIBE room:<room>`` client that records every payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from redis.asyncio import Redis

from proto import subjects
from proto.bus import ChatMessage, utcnow
from proto.ids import is_id, new_id
from proto.redis import RedisEnvelopeOut, channel, envelope, parse_channel, parse_redis_payload
from tests.conftest import ServiceFactory, Stack
from tests.support.client import Client, open_when_up
from tests.support.procs import (
    ROOT,
    NatsServer,
    RedisServer,
    ServiceProc,
    free_port,
    http_get,
    until,
)


def redis_cli(server: RedisServer, *args: str) -> str:
    """Run ``redis-cli -p PORT ...`` as a person would."""
    cli = shutil.which("redis-cli")
    assert cli, "redis-cli comes with redis-server (Debian: redis-tools)"
    out = subprocess.run(
        [cli, "-h", "127.0.0.1", "-p", str(server.port), *args],
        check=True,
        capture_output=True,
        timeout=10,
    )
    return out.stdout.decode().strip()


class RedisRoom:
    """A Redis-era server's subscription to ``room:<room>``: records every payload."""

    def __init__(self, url: str, room: str) -> None:
        self.client = Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.channel = f"room:{room}"
        self.payloads: list[bytes] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> RedisRoom:
        await self.pubsub.subscribe(self.channel)
        self._task = asyncio.create_task(self._pump())
        return self

    async def _pump(self) -> None:
        while True:
            msg = await self.pubsub.get_message(timeout=1.0)
            if msg is not None and msg["type"] == "message":
                self.payloads.append(msg["data"])

    def envelopes(self) -> list[dict[str, Any]]:
        out = []
        for p in self.payloads:
            with contextlib.suppress(ValueError):
                env = json.loads(p)
                if isinstance(env, dict):
                    out.append(env)
        return out

    def texts(self) -> list[str]:
        """Texts of every payload: an envelope's ``data.text``, or the raw text."""
        out = []
        for p in self.payloads:
            try:
                env = json.loads(p)
                out.append(env["data"]["text"] if isinstance(env, dict) else p.decode())
            except ValueError:
                out.append(p.decode(errors="replace"))
        return out

    async def wait_texts(self, expected: list[str], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not set(expected) <= set(self.texts()):
            assert time.monotonic() < deadline, f"redis got {self.texts()}, wanted {expected}"
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.client.aclose()


@contextlib.asynccontextmanager
async def redis_room(server: RedisServer, room: str) -> AsyncIterator[RedisRoom]:
    sub = await RedisRoom(server.url, room).start()
    try:
        yield sub
    finally:
        await sub.close()


def readyz(proc: ServiceProc) -> dict[str, Any]:
    body: dict[str, Any] = http_get(f"{proc.http}/readyz", 2).json()
    return body


def metrics_text(proc: ServiceProc) -> str:
    return http_get(f"{proc.http}/metrics", 5).text


async def start_bridges(
    services: ServiceFactory, nats: NatsServer, redis: RedisServer, n: int = 1, **env: object
) -> list[ServiceProc]:
    """``n`` bridge replicas, ready, one of them holding the Redis -> NATS lease."""
    bridges = [
        services("bridge", nats, REDIS_URL=redis.url, BRIDGE_LEASE_TTL=1.5, **env) for _ in range(n)
    ]
    await until(lambda: sum(readyz(b)["active"] for b in bridges) == 1, 15, "one active bridge")
    return bridges


def gateway(services: ServiceFactory, nats: NatsServer, **env: object) -> ServiceProc:
    return services("gateway", nats, **env)


async def test_redis_cli_publish_reaches_clients_on_two_gateways_once(
    shared_stack: Stack, redis_server: RedisServer, services: ServiceFactory, room: str
) -> None:
    await start_bridges(services, shared_stack.nats, redis_server)
    g1, g2 = shared_stack.gateways
    clients = [await Client.open(g.ws_url, f"u{i}") for i, g in enumerate((g1, g2, g1))]
    for c in clients:
        await c.join(room)
    async with redis_room(redis_server, room) as old_server:
        assert redis_cli(redis_server, "publish", f"room:{room}", "hi") == "2"  # bridges + us
        for c in clients:
            await c.wait_texts(["hi"], room)
        msg = clients[0].of("chat.message", text="hi")[0]["data"]
        assert msg["user"] == "redis" and msg["verified"] is False and is_id(msg["id"])
        # A marker sent after: had anything been doubled or echoed, it would be here by now.
        redis_cli(redis_server, "publish", f"room:{room}", "marker")
        for c in clients:
            await c.wait_texts(["marker"], room)
            assert c.texts(room) == ["hi", "marker"]
        await old_server.wait_texts(["marker"])
        assert old_server.payloads == [b"hi", b"marker"]  # no envelope came back to Redis


async def test_websocket_message_reaches_redis_subscriber_once_and_nothing_echoes(
    shared_stack: Stack, redis_server: RedisServer, services: ServiceFactory, room: str
) -> None:
    await start_bridges(services, shared_stack.nats, redis_server)
    g1, g2 = shared_stack.gateways
    alice, bob = await Client.open(g1.ws_url, "alice"), await Client.open(g2.ws_url, "bob")
    await alice.join(room)
    await bob.join(room)
    async with redis_room(redis_server, room) as old_server:
        await alice.send("chat.message", room=room, text="hello redis")
        await old_server.wait_texts(["hello redis"])
        env = old_server.envelopes()[0]
        assert env["type"] == "chat.message"
        data = env["data"]
        assert data["room"] == room and data["user"] == "alice" and data["via"] == "roombus"
        assert is_id(data["id"]) and data["ts"].endswith("Z")
        assert data["id"] == alice.of("chat.message", text="hello redis")[0]["data"]["id"]
        await alice.send("chat.message", room=room, text="marker")
        await old_server.wait_texts(["marker"])
        for c in (alice, bob):
            await c.wait_texts(["hello redis", "marker"], room)
        # The Redis copy of "marker" reached the bridge before "marker" reached us here,
        # so an echo of "hello redis" would have arrived already.
        redis_cli(redis_server, "publish", f"room:{room}", "from redis")
        for c in (alice, bob):
            await c.wait_texts(["from redis"], room)
            assert c.texts(room) == ["hello redis", "marker", "from redis"]
        await old_server.wait_texts(["from redis"])
        assert old_server.texts() == ["hello redis", "marker", "from redis"]


async def test_two_bridge_replicas_give_one_copy_each_way(
    shared_stack: Stack, redis_server: RedisServer, services: ServiceFactory, room: str
) -> None:
    bridges = await start_bridges(services, shared_stack.nats, redis_server, n=2)
    # The queue group spreads the stored messages over both replicas: each reaches one.
    g1, g2 = shared_stack.gateways
    a, b = await Client.open(g1.ws_url, "a"), await Client.open(g2.ws_url, "b")
    await a.join(room)
    await b.join(room)
    async with redis_room(redis_server, room) as old_server:
        for i in range(5):
            await a.send("chat.message", room=room, text=f"ws{i}")
            redis_cli(redis_server, "publish", f"room:{room}", f"redis{i}")
        want = [f"ws{i}" for i in range(5)] + [f"redis{i}" for i in range(5)]
        await old_server.wait_texts(want)
        for c in (a, b):
            await c.wait_texts(want, room)
        await b.send("chat.message", room=room, text="marker")
        redis_cli(redis_server, "publish", f"room:{room}", "marker2")
        await old_server.wait_texts(["marker", "marker2"])
        for c in (a, b):
            await c.wait_texts(["marker", "marker2"], room)
            assert sorted(c.texts(room)) == sorted([*want, "marker", "marker2"])
        assert sorted(old_server.texts()) == sorted([*want, "marker", "marker2"])
    forwarded = [
        sum(br.metric("roombus_bridge_forwarded_total", f'direction="{d}"') for br in bridges)
        for d in ("redis_to_nats", "nats_to_redis")
    ]
    assert forwarded == [6, 6]


@pytest.mark.slow
async def test_standby_replica_takes_over_when_the_active_one_dies(
    nats_server: NatsServer, redis_server: RedisServer, services: ServiceFactory, room: str
) -> None:
    bridges = await start_bridges(services, nats_server, redis_server, n=2)
    g = gateway(services, nats_server)
    c = await Client.open(g.ws_url, "c")
    await c.join(room)
    active = next(br for br in bridges if readyz(br)["active"])
    standby = next(br for br in bridges if br is not active)
    active.kill()  # kill -9: the lease is not released, it has to expire
    died = time.monotonic()
    # The lease (TTL 1.5 s) has to expire first; 10 s bounds "taken over", not its speed.
    await until(lambda: readyz(standby)["active"], 10, "the standby to take the lease")
    print(f"standby took the lease {time.monotonic() - died:.2f}s after kill -9 (TTL 1.5 s)")
    async with redis_room(redis_server, room) as old_server:
        redis_cli(redis_server, "publish", f"room:{room}", "after failover")
        await c.wait_texts(["after failover"], room)
        await c.send("chat.message", room=room, text="ws after failover")
        await old_server.wait_texts(["ws after failover"])
    # A clean stop hands the lease over at once.
    fresh = services("bridge", nats_server, REDIS_URL=redis_server.url, BRIDGE_LEASE_TTL=1.5)
    assert await asyncio.to_thread(standby.terminate) == 0
    # Handed over, not expired: the stopping replica deleted its lease.
    assert "lease released" in standby.log(), standby.log()
    await until(lambda: readyz(fresh)["active"], 10, "the lease to pass on after SIGTERM")


@pytest.mark.slow
async def test_bridge_recovers_when_redis_server_restarts(
    nats_server: NatsServer, redis_server: RedisServer, services: ServiceFactory, room: str
) -> None:
    (bridge,) = await start_bridges(services, nats_server, redis_server)
    g = gateway(services, nats_server)
    c = await Client.open(g.ws_url, "c")
    await c.join(room)
    redis_cli(redis_server, "publish", f"room:{room}", "before")
    await c.wait_texts(["before"], room)

    redis_server.kill()
    await until(lambda: not bridge.ready(), 10, "/readyz to report Redis down")
    assert readyz(bridge)["redis"] is False and readyz(bridge)["nats"] is True
    # Sent while Redis is down: queued by the bridge, published once Redis is back.
    await c.send("chat.message", room=room, text="while down")
    await c.wait_texts(["while down"], room)

    await asyncio.to_thread(redis_server.start)  # same port
    await until(bridge.ready, 20, "the bridge to reconnect to Redis")
    await until(lambda: readyz(bridge)["active"], 10, "the bridge to hold the lease again")
    async with redis_room(redis_server, room) as old_server:
        redis_cli(redis_server, "publish", f"room:{room}", "after")
        await c.wait_texts(["after"], room)
        await c.send("chat.message", room=room, text="ws after")
        await old_server.wait_texts(["ws after"])
    assert c.texts(room) == ["before", "while down", "after", "ws after"]
    assert bridge.metric("roombus_bridge_redis_reconnects_total") >= 1


@pytest.mark.slow
async def test_bridge_recovers_when_nats_server_restarts(
    fresh_nats: NatsServer, redis_server: RedisServer, services: ServiceFactory, room: str
) -> None:
    (bridge,) = await start_bridges(services, fresh_nats, redis_server)
    await asyncio.to_thread(fresh_nats.stop)
    await until(lambda: not bridge.ready(), 10, "/readyz to report NATS down")
    assert readyz(bridge)["nats"] is False
    await asyncio.to_thread(fresh_nats.start)  # same port
    await until(bridge.ready, 20, "the bridge to reconnect to NATS")
    g = gateway(services, fresh_nats)
    c = await Client.open(g.ws_url, "c")
    await c.join(room)
    async with redis_room(redis_server, room) as old_server:
        redis_cli(redis_server, "publish", f"room:{room}", "after")
        await c.wait_texts(["after"], room)
        await c.send("chat.message", room=room, text="ws after")
        await old_server.wait_texts(["ws after"])


async def test_bad_payloads_and_room_names_from_redis_are_dropped_and_counted(
    shared_stack: Stack, redis_server: RedisServer, services: ServiceFactory, room: str
) -> None:
    (bridge,) = await start_bridges(services, shared_stack.nats, redis_server)
    g = shared_stack.gateway
    c = await Client.open(g.ws_url, "c")
    await c.join(room)
    ch = f"room:{room}"
    r = Redis.from_url(redis_server.url)
    try:
        bad: list[tuple[str, bytes]] = [
            (ch, b"\xff\xfe not utf-8"),
            (ch, b"   "),
            (ch, b"x" * 4001),
            (ch, b'{"type":"chat.message","data":{"text":""}}'),
            (ch, b'{"type":"chat.message","data":{"user":"bob"}}'),
            (ch, b'{"type":"presence","data":{"text":"nope"}}'),
            (ch, b'{"type":"chat.message","data":"text"}'),
            (ch, b'{"type":"chat.message","data":{"text":"wrong room","room":"other"}}'),
            (ch, b'{"type":"chat.message","data":{"text":"who","user":"!!!"}}'),
            (f"room:{room}.message", b"dotted room"),
            (f"room:{room}*", b"star room"),
            ("room:", b"no room"),
            ("room:r\u00e9sum\u00e9", b"unicode room"),
            ("room:" + "a" * 65, b"long room"),
        ]
        for channel, payload in bad:
            await r.publish(channel, payload)
        # What Redis-era servers and people send that is fine:
        sent_id, sent_ts = new_id(), "2026-01-02T03:04:05Z"
        good = {
            "type": "chat.message",
            "data": {"text": "envelope", "user": "Old Server User", "id": sent_id, "ts": sent_ts},
        }
        await r.publish(ch, orjson.dumps(good))
        await r.publish(ch, b'{"type":"chat.message","data":{"text":"no id","id":"legacy-7"}}')
        await r.publish(ch, b"42")
        await r.publish(ch, b"{ not json, just braces")
        await r.publish(ch, "caf\u00e9 \u2615".encode())
        # Our own envelope (as if an old server re-published it) never re-enters NATS.
        own = ChatMessage(id=new_id(), room=room, user="x", text="own echo", ts=utcnow())
        await r.publish(ch, envelope(own))
        await r.publish(ch, b"marker")
    finally:
        await r.aclose()
    want = ["envelope", "no id", "42", "{ not json, just braces", "caf\u00e9 \u2615", "marker"]
    await c.wait_texts(want, room)
    assert c.texts(room) == want
    env = c.of("chat.message", text="envelope")[0]["data"]
    # Ids and timestamps from outside are never kept: roombus makes them when it stores.
    assert is_id(env["id"]) and env["id"] != sent_id and env["ts"] != sent_ts
    assert env["user"] == "Old_Server_User"
    legacy = c.of("chat.message", text="no id")[0]["data"]
    assert is_id(legacy["id"]) and legacy["user"] == "redis"

    def dropped(reason: str) -> float:
        return bridge.metric("roombus_bridge_dropped_total", f'reason="{reason}"')

    assert dropped("bad_room") == 5
    assert dropped("not_utf8") == 1 and dropped("empty") == 1 and dropped("too_long") == 1
    assert dropped("bad_envelope") == 4
    assert dropped("room_mismatch") == 1 and dropped("bad_user") == 1
    assert dropped("echo") >= 1
    assert bridge.ready() and bridge.alive()
    assert "dropped" in bridge.log()  # logged (rate-limited), not silent


async def test_bridge_rooms_setting_limits_what_crosses(
    shared_stack: Stack, redis_server: RedisServer, services: ServiceFactory, room: str
) -> None:
    other = room + "x"
    await start_bridges(services, shared_stack.nats, redis_server, BRIDGE_ROOMS=room)
    g = shared_stack.gateway
    c = await Client.open(g.ws_url, "c")
    await c.join(room)
    await c.join(other)
    async with redis_room(redis_server, other) as other_sub:
        redis_cli(redis_server, "publish", f"room:{other}", "not bridged")
        await c.send("chat.message", room=other, text="not bridged either")
        redis_cli(redis_server, "publish", f"room:{room}", "bridged")
        await c.wait_texts(["bridged", "not bridged either"])
        assert "not bridged" not in c.texts()
        await other_sub.wait_texts(["not bridged"])
        assert other_sub.texts() == ["not bridged"]


@pytest.mark.slow
async def test_throughput_each_way(
    nats_server: NatsServer, redis_server: RedisServer, services: ServiceFactory, room: str
) -> None:
    """Messages/s through one bridge each way (printed; run with -s to see the figures).
    NATS -> Redis goes through storage: what reaches Redis is what the stream republished."""
    (bridge,) = await start_bridges(services, nats_server, redis_server)
    services("history", nats_server)
    n = 20_000
    nc = await nats.connect(nats_server.url)
    r = Redis.from_url(redis_server.url)
    try:
        # Redis -> NATS
        got = 0
        done = asyncio.Event()

        async def on_msg(_msg: Any) -> None:
            nonlocal got
            got += 1
            if got == n:
                done.set()

        sub = await nc.subscribe(subjects.room_message(room), cb=on_msg)
        await nc.flush()
        start = time.perf_counter()
        for i in range(0, n, 500):
            async with r.pipeline(transaction=False) as pipe:
                for j in range(i, min(n, i + 500)):
                    pipe.publish(f"room:{room}", f"m{j}")
                await pipe.execute()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 60)
        assert got == n, f"{got} of {n} arrived\n{bridge.log()}\n" + metrics_text(bridge)
        r2n = n / (time.perf_counter() - start)
        await sub.unsubscribe()

        # NATS -> Redis
        async with redis_room(redis_server, room) as old_server:
            start = time.perf_counter()
            for j in range(n):
                msg = ChatMessage(id=new_id(), room=room, user="u", text=f"n{j}", ts=utcnow())
                await nc.publish(
                    subjects.room_message(room),
                    orjson.dumps(msg.model_dump(mode="json")),
                    headers={"Nats-Msg-Id": msg.id},
                )
            await nc.flush()
            deadline = time.monotonic() + 60
            while len(old_server.payloads) < n:
                assert time.monotonic() < deadline, (
                    f"only {len(old_server.payloads)} arrived\n" + metrics_text(bridge)
                )
                await asyncio.sleep(0.05)
            n2r = n / (time.perf_counter() - start)
            assert len(old_server.payloads) == n
    finally:
        await nc.close()
        await r.aclose()
    # A figure, not a verdict (the behaviour asserted is: all n arrive, each way).
    print(f"\nbridge throughput: Redis->NATS {r2n:,.0f} msg/s, NATS->Redis {n2r:,.0f} msg/s")


def _roombus_up(tmp_path: Path, gw_port: int, redis_url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--gateways",
            "1",
            "--history",
            "1",
            "--gateway-port",
            str(gw_port),
            "--nats-port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "stack"),
        ],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis_url, "BRIDGE_LEASE_TTL": "1.5"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
async def test_roombus_up_starts_the_bridge_when_redis_answers(
    tmp_path: Path, redis_server: RedisServer, room: str
) -> None:
    port = free_port()
    proc = _roombus_up(tmp_path, port, redis_server.url)
    try:
        c = await open_when_up(f"ws://127.0.0.1:{port}/ws", "c")
        await c.join(room)
        async with redis_room(redis_server, room) as old_server:
            # The bridge may still be starting: repeat until one copy made it across.
            deadline = time.monotonic() + 30
            while not c.texts(room):
                assert time.monotonic() < deadline, "redis-cli publish never reached the stack"
                redis_cli(redis_server, "publish", f"room:{room}", "via up")
                with contextlib.suppress(AssertionError):
                    await c.wait_texts(["via up"], room, timeout=1)
            await c.send("chat.message", room=room, text="to redis")
            await old_server.wait_texts(["to redis"])
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode(errors="replace")
    assert f"bridge:    on (Redis {redis_server.url} " in text, text[-3000:]
    assert proc.returncode == 0, text[-3000:]


@pytest.mark.slow
async def test_roombus_up_says_why_the_bridge_is_off(tmp_path: Path) -> None:
    port = free_port()
    proc = _roombus_up(tmp_path, port, f"redis://127.0.0.1:{free_port()}")
    try:
        c = await open_when_up(f"ws://127.0.0.1:{port}/ws", "c")
        await c.close()
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode(errors="replace")
    assert "bridge:    off (Redis redis://127.0.0.1:" in text and "did not answer PING" in text, (
        text
    )
    assert proc.returncode == 0, text[-3000:]


def test_envelope_to_redis_is_the_documented_shape() -> None:
    msg = ChatMessage(
        id=new_id(), room="general", user="alice", text="hi", ts=utcnow(), client_id="c1"
    )
    raw = envelope(msg)
    out = RedisEnvelopeOut.model_validate_json(raw)
    assert out.data.via == "roombus" and out.data.id == msg.id
    assert "client_id" not in orjson.loads(raw)["data"]
    # ... and the bridge never takes it back in.
    assert parse_redis_payload(raw, "general", "redis") is None


def test_redis_channel_names_follow_the_room_rule() -> None:
    assert channel("general") == "room:general"
    assert parse_channel(b"room:team-1_a") == "team-1_a"
    for bad in ("room:", "room:a.b", "room:a*", "room:a b", "rooms:x", "room:" + "a" * 65):
        assert parse_channel(bad) is None
    assert parse_channel(b"room:\xff") is None
    with pytest.raises(ValueError):
        channel("a.b")
