"""Presence across gateways: joins/leaves once per user, crash expiry, replicas, restarts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NoKeysError

from tests.conftest import ServiceFactory, Stack
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
    shared_presence_stack: Stack, room: str
) -> None:
    g1, g2 = shared_presence_stack.gateways
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


async def test_a_join_lists_everyone_whose_join_was_answered_before_it(
    shared_presence_stack: Stack, room: str
) -> None:
    """Read-your-writes across gateways: a member told ``joined`` is in the member list of
    every join that starts after that, on any gateway (the presence service answers once its
    fold reached the bucket's revision at query time)."""
    gateways = shared_presence_stack.gateways
    seen: list[str] = []
    for i in range(16):
        user = f"u{i:02d}"
        c = await Client.open(gateways[i % 2].ws_url, user)
        joined = await c.join(room)
        assert joined["data"]["members"] == sorted([*seen, user]), f"{user} joining"
        seen.append(user)


async def test_two_tabs_of_one_user_are_one_member(shared_presence_stack: Stack, room: str) -> None:
    g1, g2 = shared_presence_stack.gateways
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


@pytest.mark.slow  # kill -9, then waits out the TTL
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


async def test_typing_reaches_the_room_and_is_rate_limited(shared_stack: Stack, room: str) -> None:
    g1, g2 = shared_stack.gateways
    a, b = await Client.open(g1.ws_url, "a"), await Client.open(g2.ws_url, "b")
    await a.join(room)
    await b.join(room)
    dropped = g1.metric("roombus_gateway_dropped_total", 'reason="typing_rate"')
    for _ in range(20):
        await a.send("typing", room=room)
    await b.next("typing", user="a", room=room)
    await a.send("chat.message", room=room, text="marker")
    await b.wait_texts(["marker"])
    assert b.of("typing") == []  # the other 19 were coalesced
    assert g1.metric("roombus_gateway_dropped_total", 'reason="typing_rate"') - dropped == 19


@pytest.mark.parametrize(
    "payload",
    [
        b"junk",
        b'{"type":"join"}',
        b'{"type":"join","room":"x.y","user":"u","ts":"2026-01-01T00:00:00Z"}',
    ],
)
async def test_malformed_presence_events_on_the_bus_are_dropped(
    shared_stack: Stack, room: str, payload: bytes
) -> None:
    g = shared_stack.gateway
    c = await Client.open(g.ws_url, "c")
    await c.join(room)
    malformed = g.metric("roombus_gateway_bus_malformed_total", 'kind="room_presence"')
    nc = await nats.connect(shared_stack.nats.url)
    await nc.publish(f"room.{room}.presence", payload)
    await nc.flush()
    await until(
        lambda: (
            g.metric("roombus_gateway_bus_malformed_total", 'kind="room_presence"') >= malformed + 1
        ),
        10,
        "counted",
    )
    await c.send("chat.message", room=room, text="still here")
    await c.wait_texts(["still here"])
    assert c.of("presence") == []
    await nc.close()


async def test_presence_for_a_room_not_joined_is_an_error(
    shared_presence_stack: Stack, room: str
) -> None:
    g = shared_presence_stack.gateway
    c = await Client.open(g.ws_url, "c")
    await c.send("presence", room=room)
    await c.error("not_joined")
    await c.send("typing", room=room)
    await c.error("not_joined")
    await c.join(room)
    assert await members(c, room) == ["c"]


async def test_without_presence_service_joining_still_works(shared_stack: Stack, room: str) -> None:
    g = shared_stack.gateway
    c = await Client.open(g.ws_url, "c")
    joined = await c.join(room)
    assert "members" not in joined["data"]
    await c.send("presence", room=room)
    await c.error("unavailable")


async def bucket_members(nc: NATS, room: str) -> set[str]:
    """The users the presence bucket holds for ``room`` now (live keys, any gateway)."""
    kv = await nc.jetstream().key_value("presence")
    try:
        keys = await kv.keys()
    except NoKeysError:
        return set()
    return {k.split(".")[1] for k in keys if k.startswith(f"{room}.")}


async def until_async(cond: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


async def presence_on_bus(nc: NATS, room: str) -> list[dict[str, Any]]:
    """Every join/leave the bus carries for ``room`` from now on (appended as they come)."""
    seen: list[dict[str, Any]] = []

    async def collect(msg: Msg) -> None:
        seen.append(json.loads(msg.data))

    await nc.subscribe(f"room.{room}.presence", cb=collect)
    await nc.flush()
    return seen


async def test_changes_made_while_presence_was_down_are_announced_once_after_its_restart(
    fresh_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    ttl = 2
    p = services("presence", fresh_nats, PRESENCE_TTL=ttl)
    g1 = services("gateway", fresh_nats, PRESENCE_TTL=ttl)
    g2 = services("gateway", fresh_nats, PRESENCE_TTL=ttl)
    watcher = await Client.open(g1.ws_url, "watcher")
    await watcher.join(room)
    leavers = [await Client.open(g1.ws_url, f"l{i}") for i in range(5)]
    doomed = [await Client.open(g2.ws_url, f"d{i}") for i in range(10)]
    await asyncio.gather(*(c.join(room) for c in leavers + doomed))
    await watcher.wait(lambda _: len(events(watcher, room, "join")) == 15, 15, "15 joins")
    nc = await nats.connect(fresh_nats.url)
    on_bus = await presence_on_bus(nc, room)

    assert p.terminate() == 0  # presence is down from here...
    g2.kill()  # ...while a gateway dies without a goodbye (its 10 users expire),
    for c in leavers:  # 5 users leave
        await c.close()
    comers = [await Client.open(g1.ws_url, f"n{i}") for i in range(5)]
    await asyncio.gather(*(c.join(room) for c in comers))  # and 5 come
    after = {"watcher"} | {c.user for c in comers}

    async def settled() -> bool:
        return await bucket_members(nc, room) == after

    await until_async(settled, 6 * ttl + 10, "the bucket to settle")
    assert on_bus == []  # nobody announced anything meanwhile

    # Two replicas come back at once: each change goes out once, by one of them.
    restarted = time.monotonic()
    back = [services("presence", fresh_nats, PRESENCE_TTL=ttl, wait=False) for _ in range(2)]
    for proc in back:
        proc.wait_ready()
    await watcher.wait(
        lambda _: (
            len(events(watcher, room, "leave")) >= 15 and len(events(watcher, room, "join")) >= 20
        ),
        15,
        "15 leaves and 5 joins",
    )
    print(f"20 missed changes announced {time.monotonic() - restarted:.2f}s after the restart")
    # A live change after them: once it is here, anything else would have been too.
    marker = await Client.open(g1.ws_url, "marker")
    await marker.join(room)
    await watcher.wait(lambda _: ("marker", 7) in events(watcher, room, "join"), 10, "marker")

    left = sorted(u for u, _ in events(watcher, room, "leave"))
    assert left == sorted([c.user for c in leavers] + [c.user for c in doomed])
    joined = [u for u, _ in events(watcher, room, "join")][15:]
    assert sorted(joined) == sorted([c.user for c in comers] + ["marker"])
    assert all(count == 6 for _, count in events(watcher, room, "leave"))
    kinds = sorted((e["type"], e["user"]) for e in on_bus)
    assert kinds == sorted([("leave", u) for u in left] + [("join", u) for u in joined]), (
        "each change once on the bus"
    )
    # Its own server: no other test's room is reconciled in the count.
    assert sum(proc.metric("roombus_presence_reconciled_total") for proc in back) == 20
    assert await members(watcher, room) == sorted(after | {"marker"})
    await nc.close()


@pytest.mark.parametrize("stop", ["sigterm", "kill-9"])
async def test_presence_restarted_with_nothing_changed_announces_nothing(
    fresh_nats: NatsServer, services: ServiceFactory, room: str, stop: str
) -> None:
    p = services("presence", fresh_nats)
    g1, g2 = services("gateway", fresh_nats), services("gateway", fresh_nats)
    users = [await Client.open(g.ws_url, f"u{i}") for i, g in enumerate([g1, g2] * 3)]
    watcher = users[0]
    await watcher.join(room)  # first: a member sees only the joins made after its own
    await asyncio.gather(*(c.join(room) for c in users[1:]))
    await watcher.wait(lambda _: len(events(watcher, room, "join")) == 5, 10, "5 joins")
    nc = await nats.connect(fresh_nats.url)
    on_bus = await presence_on_bus(nc, room)
    if stop == "kill-9":
        p.kill()
    else:
        assert p.terminate() == 0
    back = [services("presence", fresh_nats, wait=False) for _ in range(2)]
    for proc in back:
        proc.wait_ready()
    marker = await Client.open(g2.ws_url, "marker")
    await marker.join(room)
    await watcher.wait(lambda _: ("marker", 7) in events(watcher, room, "join"), 10, "marker")
    # The watcher's copy came through a gateway; the test's own subscription may be later.
    await until(lambda: on_bus, 10, "the marker's join on the bus")
    assert [(e["type"], e["user"]) for e in on_bus] == [("join", "marker")]
    assert events(watcher, room, "leave") == []
    assert sum(proc.metric("roombus_presence_reconciled_total") for proc in back) == 0
    await nc.close()


async def test_first_start_with_members_already_present_announces_nothing_then_tracks_them(
    fresh_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    # Gateways ran before any presence service (or one without the announced-state bucket,
    # an upgrade): their members were never announced by it, and are not now.
    g = services("gateway", fresh_nats)
    users = [await Client.open(g.ws_url, f"u{i}") for i in range(4)]
    await asyncio.gather(*(c.join(room) for c in users))
    nc = await nats.connect(fresh_nats.url)
    on_bus = await presence_on_bus(nc, room)
    p = services("presence", fresh_nats)
    watcher = users[0]
    assert await members(watcher, room) == ["u0", "u1", "u2", "u3"]
    assert p.metric("roombus_presence_events_total", 'result="seeded"') == 4
    # The seeded state is what later changes are announced against.
    await users[3].close()
    await watcher.wait(lambda _: events(watcher, room, "leave") == [("u3", 3)], 10, "u3 leaves")
    await until(lambda: on_bus, 10, "u3's leave on the bus")
    assert [(e["type"], e["user"]) for e in on_bus] == [("leave", "u3")]
    await nc.close()
