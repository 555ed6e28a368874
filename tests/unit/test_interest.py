"""A gateway's subscriptions (``SUBSCRIBE``) in-process: the hub, its feeds and
:class:`gateway.interest.Interest` over the in-memory stream and a core-NATS stand-in
(tests/support/membus.py) — per-room subscriptions made on the first join, kept through the
linger, dropped after it; the feed reading its position only once subscribed; ``auto``
switching both ways under traffic. The oracle is the stream: each client sees its room's
messages in stream order, each once, ``prev`` linking each to the one before.
"""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import orjson
import pytest
from nats.aio.client import Client as NATS

from gateway.hub import Hub
from gateway.interest import Interest
from gateway.recovery import join_stored
from gateway.settings import GatewaySettings
from gateway.shards import Shards
from proto import subjects
from proto.ids import new_id
from proto.shards import HistoryLayout
from services.memstream import MemoryStream
from tests.support.membus import MemBus, matches
from tests.unit.test_room_delivery import WAIT, Client, _count, _now, _settle, soon

if TYPE_CHECKING:
    from gateway.core import Gateway

ROOM = "lobby"


class Gw:
    """One gateway's hub and subscriptions over a :class:`MemoryStream` and a :class:`MemBus`."""

    def __init__(
        self,
        subscribe: str = "rooms",
        linger: float = 60.0,
        auto_rooms: int = 1000,
        stream: MemoryStream | None = None,
    ) -> None:
        self.stream = stream or MemoryStream()
        self.bus = MemBus()
        self.hub = Hub(10_000)
        self.hub.start_feeds(self.stream)
        self.interest = Interest(self.hub, subscribe, linger, auto_rooms)
        self.hub.interest = self.interest
        self.sent: dict[str, list[int]] = {}
        """The stream's sequences of each room, as stored."""
        shards = Shards(HistoryLayout(1), [self.stream])
        shards.all[0].epoch = self.stream.epoch
        # What recovery reads of the gateway: its hub, settings and streams (one shard).
        self.gw = cast(
            "Gateway",
            SimpleNamespace(
                hub=self.hub, settings=GatewaySettings(request_timeout=0.2), shards=shards
            ),
        )

    async def start(self) -> Gw:
        await self.interest.start(cast(NATS, self.bus))
        return self

    def say(self, room: str, text: str) -> int:
        """Store a message and republish it on the bus; returns how many copies it made."""
        chat = {"id": new_id(), "room": room, "user": "u", "text": text, "ts": _now()}
        p = self.stream.publish(subjects.history(room), orjson.dumps(chat))
        self.sent.setdefault(room, []).append(p.seq)
        headers = {"Nats-Sequence": str(p.seq), "Nats-Last-Sequence": str(p.prev)}
        return self.bus.put(subjects.stored_room(room), p.data, headers)

    def typing(self, room: str, user: str) -> int:
        event = {"type": "typing", "room": room, "user": user, "ts": _now()}
        return self.bus.put(subjects.room_presence(room), orjson.dumps(event))

    def join(self, user: str, room: str) -> Client:
        c = Client(user)
        c.conn.dms = False  # no inbox feed: every read of the stream is a room's
        self.hub.add(c.conn)
        self.hub.join(c.conn, room)
        return c

    async def member(self, user: str, room: str = ROOM) -> Client:
        c = self.join(user, room)
        feed = self.hub.room_feed(room)
        assert feed is not None
        await asyncio.wait_for(feed.ready.wait(), WAIT)
        return c

    def leave(self, c: Client) -> None:
        self.hub.remove(c.conn)


def _mode(g: Gw) -> str:
    return g.interest.mode  # (read through a call: mypy would keep an assert's narrowing)


def _typing(c: Client) -> list[str]:
    return [f["data"]["user"] for f in c.frames if f["type"] == "typing"]


def _received() -> float:
    return _count("roombus_gateway_bus_messages_total", kind="room_message")


def test_the_stand_in_matches_subjects_as_nats_does() -> None:
    assert matches("stored.history.*", "stored.history.a")
    assert not matches("stored.history.*", "stored.history.a.b")
    assert matches("event.>", "event.a.b") and not matches("event.>", "event")
    assert not matches("room.a.presence", "room.b.presence")


# -- rooms: one subscription per room with local members --------------------------------


async def test_a_gateway_in_rooms_mode_subscribes_only_to_its_members_rooms() -> None:
    g = await Gw("rooms").start()
    assert g.bus.subjects() == []  # nobody here: no room traffic at all
    a = await g.member("a")
    assert g.bus.subjects() == [subjects.room_presence(ROOM), subjects.stored_room(ROOM)]
    received = _received()
    assert g.say("elsewhere", "not ours") == 0  # never reaches this gateway
    assert g.typing("elsewhere", "x") == 0
    assert g.say(ROOM, "one") == 1
    assert g.typing(ROOM, "b") == 1
    await soon(lambda: a.texts() == ["one"] and _typing(a) == ["b"], "the room's traffic")
    assert _received() == received + 1
    a.check_links(0)


async def test_an_ephemeral_room_gets_only_its_presence_subscription() -> None:
    g = await Gw("rooms").start()
    g.hub.is_ephemeral = lambda room: room.startswith("live-")
    g.join("a", "live-1")
    await _settle()
    assert g.bus.subjects() == [subjects.room_presence("live-1")]


async def test_a_feed_reads_its_position_only_once_its_room_is_subscribed() -> None:
    g = await Gw("rooms").start()
    g.bus.subscribing.clear()  # the subscription is slow to be made
    g.stream.pause()
    a = g.join("a", ROOM)
    await _settle()
    assert g.stream.reads == 0  # the feed waits for the subscription
    g.bus.subscribing.set()
    await soon(lambda: g.stream.reads == 1, "the feed's read of the room's position")
    assert subjects.stored_room(ROOM) in g.bus.subjects()
    # Stored after the read (whose answer is what the stream held when asked): it can only
    # come live, through the subscription made before the read.
    assert g.say(ROOM, "two") == 1
    g.stream.resume()
    await soon(lambda: a.texts() == ["two"], "the message stored after the read")
    a.check_links(0)


async def test_a_rejoin_within_the_linger_keeps_the_room_subscribed() -> None:
    g = await Gw("rooms", linger=60).start()
    a = await g.member("a")
    g.say(ROOM, "one")
    await soon(lambda: a.texts() == ["one"], "one")
    g.leave(a)
    assert g.say(ROOM, "while nobody is here") == 1  # still subscribed: lingering
    made = len(g.bus.subscribed)
    b = await g.member("b")
    start = g.sent[ROOM][-1]
    g.say(ROOM, "two")
    await soon(lambda: b.texts() == ["two"], "two")
    assert len(g.bus.subscribed) == made  # nothing subscribed again
    b.check_links(start)


@pytest.mark.parametrize("linger", [0.0, 0.01])
async def test_a_room_is_unsubscribed_once_its_linger_is_over(linger: float) -> None:
    g = await Gw("rooms", linger=linger).start()
    a = await g.member("a")
    g.leave(a)
    await soon(lambda: g.bus.subjects() == [], "the room's subscriptions gone")
    assert g.say(ROOM, "nobody here") == 0
    assert _count("roombus_gateway_room_subscriptions") == 0


@pytest.mark.parametrize("linger", [0.0, 0.002, 60.0])
async def test_join_leave_churn_loses_and_repeats_nothing(linger: float) -> None:
    """Clients join and leave four rooms at random while messages are stored in all of them:
    every membership sees its room's messages after the position its ``join`` answered, in
    order, each once."""
    g = await Gw("rooms", linger=linger).start()
    rooms = [f"r{i}" for i in range(4)]
    rng = random.Random(21)
    periods: list[tuple[Client, str, asyncio.Task[dict[str, object]]]] = []
    members: list[Client] = []
    for step in range(600):
        op = rng.random()
        if op < 0.45:
            g.say(rng.choice(rooms), f"m{step}")
        elif op < 0.75 or not members:
            room = rng.choice(rooms)
            c = Client(f"c{step}")
            c.conn.dms = False
            g.hub.add(c.conn)
            joining = asyncio.create_task(join_stored(g.gw, c.conn, room, None, None))
            periods.append((c, room, joining))
            members.append(c)
        else:
            g.leave(members.pop(rng.randrange(len(members))))
        if rng.random() < 0.3:
            await asyncio.sleep(0 if rng.random() < 0.8 else 0.003)
    for room in rooms:
        g.say(room, "last")
    await soon(
        lambda: all(c.texts()[-1:] == ["last"] for c in members if c.texts()),
        "the last message to every member still in",
    )
    # A join whose client left before the room's position was read waits out its timeout.
    await asyncio.gather(*(joining for _, _, joining in periods), return_exceptions=True)
    await _settle()
    checked = 0
    for c, room, joining in periods:
        if joining.exception() is not None:  # left before its join was answered
            continue
        position = int(str(joining.result()["seq"]))
        chats = c.chats()
        if not chats:
            continue
        # Nothing after the position is missing before the first message it got (which may
        # come before the join's answer: held while the room's position was read) ...
        assert chats[0]["prev"] <= position, (room, position, chats[0])
        # ... and from there on the stream's order, each once.
        c.check_links(chats[0]["prev"])
        stored = g.sent[room]
        i = stored.index(chats[0]["seq"])
        assert [m["seq"] for m in chats] == stored[i : i + len(chats)]
        checked += len(chats)
    assert checked > 100


# -- auto: switching both ways under traffic --------------------------------------------


async def test_auto_switches_to_the_wildcards_and_back_losing_and_repeating_nothing() -> None:
    """SUBSCRIBE_AUTO_ROOMS=3: the 4th room switches to the wildcards, leaving down to 2
    (80%) switches back; messages and presence events keep flowing through both switches."""
    g = await Gw("auto", auto_rooms=3).start()
    assert _mode(g) == "rooms" and g.bus.subjects() == []
    to_wild = _count("roombus_gateway_subscribe_switches_total", to="wildcard")
    to_rooms = _count("roombus_gateway_subscribe_switches_total", to="rooms")
    duplicates = _count("roombus_gateway_duplicates_total")
    steady = {room: await g.member(f"s-{room}", room) for room in ("r0", "r1")}
    both_ways = 0
    n = 0

    def traffic(k: int) -> None:
        nonlocal both_ways, n
        for _ in range(k):
            for room in ("r0", "r1"):
                copies = g.say(room, f"m{n}") + g.typing(room, f"p{n}")
                both_ways += copies > 2
            n += 1

    traffic(3)
    extra = [await g.member("x2", "r2")]
    traffic(2)
    assert _mode(g) == "rooms"
    g.bus.flushing.clear()  # each switch waits for its PONG until we let it go on
    extra.append(g.join("x3", "r3"))  # the 4th room: past 3
    assert _mode(g) == "wildcard"
    traffic(3)  # before the wildcards are in: the per-room way only
    await soon(lambda: subjects.STORED_ROOM_WILDCARD in g.bus.subjects(), "the wildcards")
    traffic(3)  # both ways
    g.bus.flushing.set()
    await soon(lambda: not g.interest.rooms, "the per-room subscriptions dropped")
    assert sorted(g.bus.subjects()) == sorted(
        [subjects.STORED_ROOM_WILDCARD, subjects.ROOM_PRESENCE_WILDCARD]
    )
    traffic(3)
    g.leave(extra.pop())  # 3 rooms: still above 80% of 3
    assert _mode(g) == "wildcard"
    traffic(2)
    g.bus.flushing.clear()
    g.leave(extra.pop())  # 2 rooms: back to one subscription per room
    assert _mode(g) == "rooms"
    traffic(3)
    await soon(lambda: all(own.sent for own in g.interest.rooms.values()), "per-room ones")
    traffic(3)  # both ways
    g.bus.flushing.set()
    await soon(lambda: subjects.STORED_ROOM_WILDCARD not in g.bus.subjects(), "wildcards gone")
    traffic(3)
    assert g.bus.subjects() == sorted(
        [subjects.stored_room(r) for r in ("r0", "r1")]
        + [subjects.room_presence(r) for r in ("r0", "r1")]
    )
    want = {room: [f"m{i}" for i in range(n)] for room in steady}
    typing = [f"p{i}" for i in range(n)]
    await soon(
        lambda: all(c.texts() == want[r] and _typing(c) == typing for r, c in steady.items()),
        "every message and presence event, once, in order",
    )
    await _settle()
    for c in steady.values():
        c.check_links(0)
        assert _typing(c) == typing
    assert both_ways > 0  # the switches did deliver both ways for a while
    assert _count("roombus_gateway_duplicates_total") > duplicates  # dropped by seq
    assert _count("roombus_gateway_subscribe_switches_total", to="wildcard") == to_wild + 1
    assert _count("roombus_gateway_subscribe_switches_total", to="rooms") == to_rooms + 1


@pytest.mark.parametrize("to", ["wildcard", "rooms"])
async def test_a_switch_lets_the_old_subscriptions_hand_in_what_they_hold(to: str) -> None:
    """A message that came only the old way (before the new subscriptions were in), still in
    the old subscription's queue: delivered before the old way is dropped, even with no later
    message to reveal a gap."""
    g = await Gw("auto", auto_rooms=2).start()  # wildcards above 2 rooms, per-room at <= 1
    a = await g.member("a", "r0")
    others = [await g.member("b", "r1")]
    if to == "rooms":
        others.append(await g.member("c", "r2"))
        await soon(lambda: not g.interest.rooms, "the wildcards alone")
    old = g.bus.sub(
        subjects.stored_room("r0") if to == "wildcard" else subjects.STORED_ROOM_WILDCARD
    )
    old.running.clear()  # its task is behind
    if to == "wildcard":
        others.append(g.join("c", "r2"))
    else:
        for c in others:
            g.leave(c)
    assert _mode(g) == to
    assert g.say("r0", "only the old way") == 1
    await soon(lambda: len(g.bus.subscribed) > 4, "the new way subscribed")
    await _settle()
    assert old.sid in g.bus.subs  # not dropped while it holds a message
    old.running.set()
    await soon(lambda: old.sid not in g.bus.subs, "the old way dropped")
    await soon(lambda: a.texts() == ["only the old way"], "the message")
    a.check_links(0)


async def test_rooms_joined_while_a_switch_is_half_way_lose_nothing() -> None:
    """Joins while each switch waits for its PONG (both ways subscribed, the old way not yet
    dropped): every room's messages reach its members once, in order."""
    g = await Gw("auto", auto_rooms=2).start()  # wildcards above 2 rooms, per-room at <= 1
    clients: dict[str, Client] = {"r0": await g.member("a", "r0")}
    clients["r1"] = await g.member("b", "r1")
    g.bus.flushing.clear()
    clients["r2"] = await g.member("c", "r2")  # 3 rooms: the wildcards come in
    assert _mode(g) == "wildcard"
    clients["r3"] = await g.member("d", "r3")  # read while the per-room ones are still in
    for room in clients:
        g.say(room, f"{room}-1")
    assert g.say("r0", "r0-2") == 2  # both ways
    g.bus.flushing.set()
    await soon(lambda: not g.interest.rooms, "the per-room subscriptions dropped")
    for room in clients:
        g.say(room, f"{room}-3")
    g.bus.flushing.clear()
    for room in ("r3", "r2", "r1"):
        g.leave(clients.pop(room))  # 1 room: back to per-room subscriptions
    assert _mode(g) == "rooms"
    clients["r4"] = await g.member("e", "r4")
    for room in clients:
        g.say(room, f"{room}-4")
    g.bus.flushing.set()
    await soon(lambda: subjects.STORED_ROOM_WILDCARD not in g.bus.subjects(), "wildcards gone")
    for room in clients:
        g.say(room, f"{room}-5")
    want = {"r0": ["r0-1", "r0-2", "r0-3", "r0-4", "r0-5"], "r4": ["r4-4", "r4-5"]}
    await soon(lambda: all(clients[r].texts() == w for r, w in want.items()), "every message")
    await _settle()
    for room, c in clients.items():
        assert c.texts() == want[room]
        c.check_links(0)
