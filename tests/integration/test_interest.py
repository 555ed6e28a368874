"""Interest-based subscriptions (``SUBSCRIBE``, issue 21) through real processes: gateways that
subscribe room by room (and one with the wildcards alongside) under traffic from several
senders while clients join and leave rooms over and over; ``auto`` switching both ways
mid-traffic. The oracle is the stream: every receiver sees its room's messages in stream
order, each once (``seq``/``prev``), from the position its ``join`` answered.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from tests.conftest import ServiceFactory
from tests.integration.test_history import assert_one_order
from tests.integration.test_order import Sender
from tests.support.client import Client
from tests.support.procs import NatsServer, ServiceProc, until
from tests.support.stored import stored_messages

pytestmark = pytest.mark.slow

LINGER = 0.5
"""SUBSCRIBE_LINGER of the per-room gateways: churn pauses both shorter and longer."""


class Churner:
    """One connection that joins a room, stays a moment, leaves, pauses, and again."""

    def __init__(self, client: Client, rooms: list[str], seed: int) -> None:
        self.c, self.rooms, self.rng = client, rooms, random.Random(seed)
        self.joins = 0

    async def run(self, stop: asyncio.Event) -> None:
        c = self.c
        while not stop.is_set():
            room = self.rng.choice(self.rooms)
            n = len(c.of("joined"))
            await c.send("join", room=room)
            await c.wait(lambda _, n=n: len(c.of("joined")) > n, 10, "joined")
            self.joins += 1
            await asyncio.sleep(self.rng.uniform(0, 0.3))  # a member for a while
            n = len(c.of("left"))
            await c.send("leave", room=room)
            await c.wait(lambda _, n=n: len(c.of("left")) > n, 10, "left")
            # Back within the linger (still subscribed), or after it (subscribed again).
            await asyncio.sleep(self.rng.choice([0.0, 0.05, 0.2, LINGER * 2]))

    def periods(self) -> list[tuple[str, int, list[dict[str, Any]]]]:
        """(room, the joined seq, its chat messages) of each membership, in order. A room's
        messages may come just before its ``joined`` (held while its position was read):
        they belong to the membership the next ``left`` ends."""
        out: list[tuple[str, int, list[dict[str, Any]]]] = []
        chats: list[dict[str, Any]] = []
        joined: dict[str, Any] | None = None
        for f in self.c.frames:
            if f["type"] == "chat.message":
                chats.append(f["data"])
            elif f["type"] == "joined":
                joined = f["data"]
            elif f["type"] == "left":
                assert joined is not None and joined["room"] == f["data"]["room"]
                out.append((joined["room"], int(joined["seq"]), chats))
                chats, joined = [], None
        assert not chats, f"{self.c.user}: messages after its last leave"
        return out


def check_period(
    who: str, room: str, position: int, chats: list[dict[str, Any]], stored: list[int]
) -> int:
    """One membership saw its room's stream from its position on: in order, each once."""
    if not chats:
        return 0
    assert {m["room"] for m in chats} == {room}, who
    assert chats[0]["prev"] <= position, f"{who} {room}: missed messages after {position}"
    prev = chats[0]["prev"]
    for m in chats:
        assert m["prev"] == prev, f"{who} {room}: broken prev link at seq {m['seq']}"
        prev = m["seq"]
    i = stored.index(chats[0]["seq"])
    assert [m["seq"] for m in chats] == stored[i : i + len(chats)], f"{who} {room}"
    return len(chats)


async def _stored(nats_url: str, rooms: list[str]) -> dict[str, list[dict[str, object]]]:
    return {room: await stored_messages(nats_url, room) for room in rooms}


async def _steady(g: ServiceProc, user: str, room: str) -> tuple[Client, str, int]:
    c = await Client.open(g.ws_url, user)
    return c, room, int((await c.join(room))["data"]["seq"])


async def test_room_by_room_gateways_deliver_each_rooms_stream_once_through_churn(
    fresh_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    """2 gateways with SUBSCRIBE=rooms and one with the wildcards; 3 senders, 5 receivers and
    6 clients joining and leaving the 3 rooms all along; a 4th (rooms) gateway whose only
    member is in a room nobody writes to gets none of the traffic."""
    per_room = {"SUBSCRIBE": "rooms", "SUBSCRIBE_LINGER": LINGER}
    g1 = services("gateway", fresh_nats, **per_room)
    g2 = services("gateway", fresh_nats, **per_room)
    wild = services("gateway", fresh_nats)
    quiet = services("gateway", fresh_nats, **per_room)
    rooms = [f"{room}-{i}" for i in range(3)]
    lone = await Client.open(quiet.ws_url, "lone")
    await lone.join(f"{room}-quiet")
    # Steady members: room 0 on g1, room 1 on g2, every room on the wildcard gateway; so
    # g1's rooms 1 and 2 and g2's rooms 0 and 2 have only churning members.
    receivers = [
        await _steady(g, f"recv-{i}-{g.port}", r)
        for g, i, r in [(g1, 0, rooms[0]), (g2, 1, rooms[1])]
        + [(wild, i, r) for i, r in enumerate(rooms)]
    ]
    senders = []
    for i, r in enumerate(rooms):
        c = await Client.open((g1, g2, wild)[i].ws_url, f"send-{i}")
        await c.join(r)
        senders.append(Sender(c, r))
    churners = [
        Churner(await Client.open(g.ws_url, f"churn-{i}"), rooms, seed=i)
        for i, g in enumerate([g1, g2] * 3)
    ]
    stop = asyncio.Event()
    churning = [asyncio.create_task(ch.run(stop)) for ch in churners]
    await asyncio.gather(*(s.run(400, pace=0.01) for s in senders))
    stop.set()
    await asyncio.gather(*churning)
    for s in senders:
        await s.settle()
    stored = await _stored(fresh_nats.url, rooms)
    total = sum(len(v) for v in stored.values())
    assert total == 1200
    for c, r, start in receivers:
        want = sum(1 for m in stored[r] if int(str(m["seq"])) > start)
        await c.wait(lambda _, c=c, r=r, w=want: len(c.texts(r)) >= w, 60, "every message")
        assert_one_order(c, r, start, stored[r])
    seqs = {r: [int(str(m["seq"])) for m in v] for r, v in stored.items()}
    checked = sum(
        check_period(ch.c.user, r, position, chats, seqs[r])
        for ch in churners
        for r, position, chats in ch.periods()
    )
    joins = sum(ch.joins for ch in churners)
    assert checked > 0 and joins > 20
    # The quiet gateway: one room of its own, none of the traffic.
    assert quiet.metric("roombus_gateway_bus_messages_total", 'kind="room_message"') == 0
    assert quiet.metric("roombus_gateway_room_subscriptions") == 1
    assert quiet.metric("roombus_gateway_subscribe_mode", 'mode="rooms"') == 1
    assert wild.metric("roombus_gateway_bus_messages_total", 'kind="room_message"') >= total
    assert wild.metric("roombus_gateway_room_subscriptions") == 0
    # Rooms were subscribed again after a linger ran out, and rejoins within it were not.
    subscribes = sum(g.metric("roombus_gateway_room_subscribes_total") for g in (g1, g2))
    assert len(rooms) < subscribes < joins + len(rooms)
    print(
        f"churn: {total} stored, {joins} churn joins, {subscribes:.0f} room subscriptions made,"
        f" {checked} churn deliveries checked"
    )


async def test_auto_switches_both_ways_mid_traffic_losing_and_repeating_nothing(
    fresh_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    """SUBSCRIBE=auto with SUBSCRIBE_AUTO_ROOMS=3: a client takes the gateway to 4 rooms
    (wildcards) and back to 2 (per room), again and again, while senders on another gateway
    write to every room and a typist sends typing signals: the steady receivers see every
    message and every typing signal once."""
    auto = services("gateway", fresh_nats, SUBSCRIBE="auto", SUBSCRIBE_AUTO_ROOMS=3)
    other = services("gateway", fresh_nats, TYPING_INTERVAL=0.1)
    rooms = [f"{room}-{i}" for i in range(4)]
    receivers = [await _steady(auto, f"recv-{i}", r) for i, r in enumerate(rooms[:2])]
    oracle = await nats.connect(fresh_nats.url)
    typed: list[Msg] = []

    async def typing(msg: Msg) -> None:
        if b'"typing"' in msg.data:
            typed.append(msg)

    await oracle.subscribe(f"room.{rooms[0]}.presence", cb=typing)
    await oracle.flush()
    try:
        senders = []
        for i, r in enumerate(rooms):
            c = await Client.open(other.ws_url, f"send-{i}")
            await c.join(r)
            senders.append(Sender(c, r))
        typist = await Client.open(other.ws_url, "typist")
        await typist.join(rooms[0])
        switcher = await Client.open(auto.ws_url, "switcher")
        stop = asyncio.Event()

        async def switch() -> None:
            while not stop.is_set():
                for r in rooms[2:]:  # 3, then 4 rooms: past 3, the wildcards
                    await switcher.join(r)
                await until(
                    lambda: auto.metric("roombus_gateway_room_subscriptions") == 0, 20, "wild"
                )
                for r in rooms[2:]:  # back to 2: per room again
                    await switcher.send("leave", room=r)
                    await switcher.next("left", room=r)
                await until(
                    lambda: auto.metric("roombus_gateway_subscribe_mode", 'mode="rooms"') == 1,
                    20,
                    "per-room again",
                )

        async def type_away() -> None:
            while not stop.is_set():
                await typist.send("typing", room=rooms[0])
                await asyncio.sleep(0.15)

        side = [asyncio.create_task(switch()), asyncio.create_task(type_away())]
        await asyncio.gather(*(s.run(200, pace=0.02) for s in senders))
        stop.set()
        await asyncio.gather(*side)
        for s in senders:
            await s.settle()
        stored = await _stored(fresh_nats.url, rooms)
        for c, r, start in receivers:
            want = sum(1 for m in stored[r] if int(str(m["seq"])) > start)
            await c.wait(lambda _, c=c, r=r, w=want: len(c.texts(r)) >= w, 60, "every message")
            assert_one_order(c, r, start, stored[r])
        # Every typing signal published in the room reached its receiver once.
        recv0 = receivers[0][0]
        await recv0.wait(lambda _: len(recv0.of("typing")) >= len(typed), 20, "typing signals")
        # A message sent after the last signal, through storage (slower): any late copy of
        # a signal is in by the time it arrives.
        await senders[0].c.send("chat.message", room=rooms[0], text="marker", client_id="mk")
        await recv0.wait_texts(["marker"], rooms[0], timeout=30)
        assert len(recv0.of("typing")) == len(typed) > 0
        to_wild = auto.metric("roombus_gateway_subscribe_switches_total", 'to="wildcard"')
        to_rooms = auto.metric("roombus_gateway_subscribe_switches_total", 'to="rooms"')
        assert to_wild >= 1 and to_rooms >= 1
        duplicates = auto.metric("roombus_gateway_duplicates_total")
        print(
            f"auto: {to_wild:.0f} switches to the wildcards, {to_rooms:.0f} back;"
            f" {sum(len(v) for v in stored.values())} stored, {len(typed)} typing signals,"
            f" {duplicates:.0f} duplicates dropped by seq"
        )
    finally:
        await oracle.close()
