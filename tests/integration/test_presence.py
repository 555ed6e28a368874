"""Presence across gateways: joins/leaves once per user, crash expiry, replicas, restarts."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from nats.aio.msg import Msg

from tests.conftest import ServiceFactory
from tests.support.client import Client
from tests.support.procs import NatsServer, until


def events(c: Client, room: str, kind: str) -> list[tuple[str, int]]:
    """(user, count) of the ``kind`` events ``c`` saw, leaving out its own."""
    return [
        (f["data"]["user"], f["data"]["count"])
        for f in c.frames
        if f["type"] == "presence"
        and f["data"].get("event") == kind
        and f["data"]["room"] == room
        and f["data"]["user"] != c.user
    ]


async def members(c: Client, room: str) -> list[str]:
    await c.send("presence", room=room)
    frame = await c.next("presence", room=room, event=None)
    return list(frame["data"]["members"])


async def test_join_and_leave_are_seen_across_gateways(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    services("presence", nats_server)
    g1, g2 = services("gateway", nats_server), services("gateway", nats_server)
    alice = await Client.open(g1.ws_url, "alice")
    joined = await alice.join(room)
    assert joined["data"]["members"] == ["alice"]
    bob = await Client.open(g2.ws_url, "bob")
    joined = await bob.join(room)
    assert joined["data"]["members"] == ["alice", "bob"]
    await alice.wait(lambda _: ("bob", 2) in events(alice, room, "join"), 10, "bob joins")
    assert await members(alice, room) == ["alice", "bob"]
    await bob.send("leave", room=room)
    await alice.wait(lambda _: ("bob", 1) in events(alice, room, "leave"), 10, "bob leaves")
    assert await members(alice, room) == ["alice"]


async def test_two_tabs_of_one_user_are_one_member(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    services("presence", nats_server)
    g1, g2 = services("gateway", nats_server), services("gateway", nats_server)
    watcher = await Client.open(g1.ws_url, "watcher")
    await watcher.join(room)
    tab1 = await Client.open(g1.ws_url, "carol")
    await tab1.join(room)
    tab2 = await Client.open(g2.ws_url, "carol")  # another tab, on another gateway
    await tab2.join(room)
    tab3 = await Client.open(g1.ws_url, "carol")  # and one more on the same gateway
    await tab3.join(room)
    await watcher.wait(lambda _: events(watcher, room, "join") == [("carol", 2)], 10, "one join")
    assert await members(watcher, room) == ["carol", "watcher"]
    await tab1.close()
    await tab2.close()
    # Still one tab open: no leave. A presence query after the closes proves they were seen.
    await until(lambda: g2.metric("roombus_gateway_open_connections") == 0, 10, "tab2 closed")
    assert await members(watcher, room) == ["carol", "watcher"]
    assert events(watcher, room, "leave") == []
    await tab3.close()
    await watcher.wait(lambda _: events(watcher, room, "leave") == [("carol", 1)], 10, "leave")
    assert events(watcher, room, "join") == [("carol", 2)]


async def test_users_of_a_killed_gateway_leave_within_the_ttl(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    ttl = 3
    services("presence", nats_server, PRESENCE_TTL=ttl)
    g1 = services("gateway", nats_server, PRESENCE_TTL=ttl)
    g2 = services("gateway", nats_server, PRESENCE_TTL=ttl)
    watcher = await Client.open(g1.ws_url, "watcher")
    await watcher.join(room)
    doomed = [await Client.open(g2.ws_url, f"d{i}") for i in range(3)]
    for c in doomed:
        await c.join(room)
    await watcher.wait(lambda _: len(events(watcher, room, "join")) == 3, 10, "3 joins")
    g2.kill()  # kill -9: no goodbye
    killed_at = time.monotonic()
    # Nothing but the keys' TTL can make them leave (no goodbye was sent), so leaving at all
    # is the behaviour; the deadline (5x the TTL) only bounds "within the TTL" loosely enough
    # for a loaded machine. The figure is printed.
    await watcher.wait(lambda _: len(events(watcher, room, "leave")) == 3, 5 * ttl, "leaves")
    print(
        f"dead gateway's users gone after {time.monotonic() - killed_at:.1f}s (PRESENCE_TTL={ttl})"
    )
    assert await members(watcher, room) == ["watcher"]


async def test_restarted_presence_service_keeps_state_and_emits_nothing_spurious(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    p = services("presence", nats_server)
    g = services("gateway", nats_server)
    clients = [await Client.open(g.ws_url, f"u{i}") for i in range(3)]
    for c in clients:
        await c.join(room)
    watcher = clients[0]
    await watcher.wait(lambda _: len(events(watcher, room, "join")) == 2, 10, "joins")
    assert await asyncio.to_thread(p.terminate) == 0
    services("presence", nats_server)
    assert await members(watcher, room) == ["u0", "u1", "u2"]
    # A real change after the restart is still reported, and nothing else was.
    late = await Client.open(g.ws_url, "late")
    await late.join(room)
    await watcher.wait(lambda _: ("late", 4) in events(watcher, room, "join"), 10, "late join")
    assert events(watcher, room, "leave") == []
    assert len(events(watcher, room, "join")) == 3


async def test_two_presence_replicas_emit_each_event_once(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    services("presence", nats_server)
    services("presence", nats_server)
    g = services("gateway", nats_server)
    nc = await nats.connect(nats_server.url)
    on_bus: list[bytes] = []

    async def collect(msg: Msg) -> None:
        on_bus.append(msg.data)

    await nc.subscribe(f"room.{room}.presence", cb=collect)
    await nc.flush()
    users = [await Client.open(g.ws_url, f"p{i}") for i in range(5)]
    for c in users:
        await c.join(room)
    for c in users[1:]:
        await c.close()
    watcher = users[0]
    await watcher.wait(lambda _: len(events(watcher, room, "leave")) == 4, 10, "4 leaves")
    marker = await Client.open(g.ws_url, "marker")
    await marker.join(room)
    await watcher.wait(lambda _: ("marker", 2) in events(watcher, room, "join"), 10, "marker")
    assert len(events(watcher, room, "join")) == 5  # p1..p4 and the marker
    assert len(on_bus) == 10  # 5 joins (p0 included) + 4 leaves + marker, each once
    await nc.close()


async def test_typing_reaches_the_room_and_is_rate_limited(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    g1, g2 = services("gateway", nats_server), services("gateway", nats_server)
    a, b = await Client.open(g1.ws_url, "a"), await Client.open(g2.ws_url, "b")
    await a.join(room)
    await b.join(room)
    for _ in range(20):
        await a.send("typing", room=room)
    await b.next("typing", user="a", room=room)
    await a.send("chat.message", room=room, text="marker")
    await b.wait_texts(["marker"])
    assert b.of("typing") == []  # the other 19 were coalesced
    assert g1.metric("roombus_gateway_dropped_total", 'reason="typing_rate"') == 19


@pytest.mark.parametrize(
    "payload",
    [
        b"junk",
        b'{"type":"join"}',
        b'{"type":"join","room":"x.y","user":"u","ts":"2026-01-01T00:00:00Z"}',
    ],
)
async def test_malformed_presence_events_on_the_bus_are_dropped(
    nats_server: NatsServer, services: ServiceFactory, room: str, payload: bytes
) -> None:
    g = services("gateway", nats_server)
    c = await Client.open(g.ws_url, "c")
    await c.join(room)
    nc = await nats.connect(nats_server.url)
    await nc.publish(f"room.{room}.presence", payload)
    await nc.flush()
    await until(
        lambda: g.metric("roombus_gateway_bus_malformed_total", 'kind="room_presence"') >= 1,
        10,
        "counted",
    )
    await c.send("chat.message", room=room, text="still here")
    await c.wait_texts(["still here"])
    assert c.of("presence") == []
    await nc.close()


async def test_presence_for_a_room_not_joined_is_an_error(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    services("presence", nats_server)
    g = services("gateway", nats_server)
    c = await Client.open(g.ws_url, "c")
    await c.send("presence", room=room)
    await c.error("not_joined")
    await c.send("typing", room=room)
    await c.error("not_joined")
    await c.join(room)
    assert await members(c, room) == ["c"]


async def test_without_presence_service_joining_still_works(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    g = services("gateway", nats_server)
    c = await Client.open(g.ws_url, "c")
    joined = await c.join(room)
    assert "members" not in joined["data"]
    await c.send("presence", room=room)
    await c.error("unavailable")
