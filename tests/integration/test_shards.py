"""History shards (``HISTORY_SHARDS=3``) on one real nats-server: rooms spread over three
streams, each room keeps its one order with its shard's seq and epoch, replay and history pages
work per room, DMs live in shard 0, subscribers see the single stream's subjects, the bridge
still relays; another shard count on existing streams is refused (history) or reported
(gateway ``/readyz``)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import nats
import pytest
from nats.js.errors import NotFoundError

from proto.shards import HistoryLayout, shard_of
from tests.conftest import ServiceFactory
from tests.integration.test_bridge import redis_cli, redis_room, start_bridges
from tests.integration.test_history import assert_one_order, send_and_ack
from tests.support.client import Client
from tests.support.procs import NatsServer, RedisServer, ServiceProc, http_get, until, wait_for
from tests.support.stored import stored_messages

SHARDS = 3
LAYOUT = HistoryLayout(SHARDS)
PER_ROOM = 12


def rooms_in_every_shard(per_shard: int) -> list[str]:
    """Fresh room names, ``per_shard`` of them in each shard."""
    prefix = "s" + uuid.uuid4().hex[:8]
    rooms: list[str] = []
    counts = [0] * SHARDS
    i = 0
    while min(counts) < per_shard:
        room = f"{prefix}-{i}"
        i += 1
        if counts[shard_of(room, SHARDS)] < per_shard:
            counts[shard_of(room, SHARDS)] += 1
            rooms.append(room)
    return rooms


def epoch_of(info: Any) -> str:
    """A stream's epoch as the gateways report it: its creation time in µs."""
    return str(int(info.created.timestamp() * 1_000_000))


def readyz(proc: ServiceProc) -> tuple[int, dict[str, Any]]:
    resp = http_get(f"{proc.http}/readyz", 2)
    body: dict[str, Any] = resp.json()
    return resp.status_code, body


async def not_ready(proc: ServiceProc) -> dict[str, Any]:
    """Wait until ``proc`` answers /readyz with 503; returns what it says."""
    said: list[dict[str, Any]] = []

    def unready() -> bool:
        status, body = readyz(proc)
        said.append(body)
        return status == 503

    await until(unready, 20, f"{proc.service} to say it is not ready")
    return said[-1]


def exits_saying(proc: ServiceProc, *words: str) -> str:
    """Wait for ``proc`` to fail at start; returns its log, which must hold ``words``."""
    wait_for(lambda: proc.proc is not None and proc.proc.poll() is not None, 60, "the exit")
    assert proc.proc is not None and proc.proc.returncode != 0
    log = proc.log()
    for w in words:
        assert w in log, log
    return log


async def rejoin_replays_the_rest(
    g: ServiceProc, room: str, msgs: list[dict[str, Any]], epoch: str
) -> None:
    """A rejoin with ``since`` replays exactly what came after, in the shard's sequence."""
    late = await Client.open(g.ws_url, "late")
    since = int(msgs[3]["seq"])
    await late.send("join", room=room, since=since, epoch=epoch)
    rejoined = (await late.next("joined", room=room))["data"]
    assert rejoined["recovered"] is True and rejoined["seq"] == since
    await late.wait(lambda _: len(late.texts(room)) >= len(msgs) - 4, 10, "the replay")
    assert_one_order(late, room, since, msgs)
    await late.close()


async def history_pages(c: Client, room: str, limit: int) -> list[list[int]]:
    """The seqs of every ``history`` page of ``room``, newest page first."""
    pages: list[list[int]] = []
    before = None
    while True:
        await c.send("history", room=room, limit=limit, **({"before": before} if before else {}))
        page = (await c.next("history", room=room))["data"]
        pages.append([m["seq"] for m in page["messages"]])
        if not page["has_more"]:
            return pages
        before = page["messages"][0]["seq"]


async def test_rooms_spread_over_three_shards_and_each_keeps_its_one_order(
    fresh_nats: NatsServer, services: ServiceFactory
) -> None:
    services("history", fresh_nats, HISTORY_SHARDS=SHARDS)
    g1 = services("gateway", fresh_nats, HISTORY_SHARDS=SHARDS)
    g2 = services("gateway", fresh_nats, HISTORY_SHARDS=SHARDS)
    rooms = rooms_in_every_shard(3)
    # What a `nats sub 'stored.>'` user sees: the single stream's subjects, whatever the shard.
    nc = await nats.connect(fresh_nats.url)
    seen_subjects: set[str] = set()

    async def saw(msg: Any) -> None:
        seen_subjects.add(msg.subject)

    await nc.subscribe("stored.>", cb=saw)
    receivers = [await Client.open(g.ws_url, f"recv{i}") for i, g in enumerate((g1, g2))]
    senders = [await Client.open(g.ws_url, f"send{i}") for i, g in enumerate((g1, g2, g1))]
    joined: dict[str, dict[str, Any]] = {}
    for c in receivers + senders:
        for room in rooms:
            joined[room] = (await c.join(room))["data"]
            assert joined[room]["seq"] == 0

    async def send_all(c: Client) -> dict[str, dict[str, object]]:
        acks: dict[str, dict[str, object]] = {}
        for i in range(PER_ROOM // len(senders)):
            for room in rooms:  # interleaved over rooms and shards
                acks |= await send_and_ack(c, room, [f"{c.user} {room} {i}"])
        return acks

    acks = await asyncio.gather(*(send_all(c) for c in senders))
    stored = {room: await stored_messages(fresh_nats.url, room, SHARDS) for room in rooms}
    by_id = {m["id"]: m["seq"] for msgs in stored.values() for m in msgs}
    assert all(len(stored[room]) == PER_ROOM for room in rooms)
    assert all(by_id[a["id"]] == a["seq"] for per in acks for a in per.values())
    for c in receivers + senders:
        for room in rooms:
            await c.wait(lambda _, c=c, r=room: len(c.texts(r)) >= PER_ROOM, 20, f"{room} all")
            assert_one_order(c, room, 0, stored[room])

    # Every shard holds its rooms, on history.<p>.<room>; there is no HISTORY stream.
    js = nc.jetstream()
    infos = {}
    for p in range(SHARDS):
        info = await js.stream_info(f"HISTORY_{p}", subjects_filter=">")
        infos[p] = info
        mine = [r for r in rooms if shard_of(r, SHARDS) == p]
        assert info.state.messages == PER_ROOM * len(mine)
        assert set(info.state.subjects or {}) == {f"history.{p}.{r}" for r in mine}
    with pytest.raises(NotFoundError):
        await js.stream_info("HISTORY")
    # joined.epoch is the room's shard's; seqs are per shard.
    for room in rooms:
        assert joined[room]["epoch"] == epoch_of(infos[shard_of(room, SHARDS)])
    await until(lambda: {f"stored.history.{r}" for r in rooms} <= seen_subjects, 10, "subjects")
    assert seen_subjects == {f"stored.history.{r}" for r in rooms}

    for p in range(SHARDS):
        room = next(r for r in rooms if shard_of(r, SHARDS) == p)
        await rejoin_replays_the_rest(g2, room, stored[room], joined[room]["epoch"])
        seqs = [int(m["seq"]) for m in stored[room]]
        assert await history_pages(receivers[0], room, 5) == [seqs[7:], seqs[2:7], seqs[:2]]

    # DMs: both inbox copies in HISTORY_0, delivered live and read back with dm.history.
    alice, bob = await Client.open(g1.ws_url, "alice"), await Client.open(g2.ws_url, "bob")
    await alice.send("dm", to="bob", text="psst", client_id="d1")
    ack = (await alice.next("ack", client_id="d1"))["data"]
    live = (await bob.next("dm"))["data"]
    assert live["text"] == "psst" and live["from"] == "alice"
    await bob.send("dm.history", limit=10)
    page = (await bob.next("dm.history"))["data"]["messages"]
    assert [(m["text"], m["seq"]) for m in page] == [("psst", live["seq"])]
    info = await js.stream_info("HISTORY_0", subjects_filter="inbox.>")
    assert set(info.state.subjects or {}) == {"inbox.0.alice", "inbox.0.bob"}
    got = await js.get_msg("HISTORY_0", int(str(ack["seq"])))
    assert got.subject == "inbox.0.alice"  # the sender's copy: its seq is the ack's
    await until(lambda: {"stored.inbox.alice", "stored.inbox.bob"} <= seen_subjects, 10, "dm")
    await nc.close()

    # Another shard count on these streams: history refuses to start, a gateway is not ready.
    h1 = services("history", fresh_nats, wait=False, HISTORY_SHARDS=1)
    exits_saying(
        h1,
        "streams HISTORY_0, HISTORY_1, HISTORY_2 have",
        "but HISTORY_SHARDS=1",
        "Set HISTORY_SHARDS=3",
    )
    g3 = services("gateway", fresh_nats, wait=False, HISTORY_SHARDS=2)
    body = await not_ready(g3)
    assert body["history_shards"] == 2 and "HISTORY_SHARDS=3" in body["history_layout"]
    assert "history streams are not the configured layout" in g3.log()


async def test_history_refuses_another_shard_count_on_existing_messages(
    fresh_nats: NatsServer, services: ServiceFactory
) -> None:
    h = services("history", fresh_nats)
    g = services("gateway", fresh_nats)
    c = await Client.open(g.ws_url, "alice")
    await c.join("lobby")
    await send_and_ack(c, "lobby", ["one", "two", "three"])
    assert h.terminate() == 0
    refused = services("history", fresh_nats, wait=False, HISTORY_SHARDS=3)
    exits_saying(
        refused,
        "stream HISTORY has 3 messages but HISTORY_SHARDS=3",
        "Set HISTORY_SHARDS=1",
        "nats stream rm HISTORY",
        "refusing to start",
    )
    # Nothing was created or changed: the single stream is there, intact.
    nc = await nats.connect(fresh_nats.url)
    try:
        js = nc.jetstream()
        assert (await js.stream_info("HISTORY")).state.messages == 3
        with pytest.raises(NotFoundError):
            await js.stream_info("HISTORY_0")
    finally:
        await nc.close()
    # The gateway that runs with HISTORY_SHARDS=1 is unaffected; one with 3 says what is wrong.
    assert readyz(g)[0] == 200
    g3 = services("gateway", fresh_nats, wait=False, HISTORY_SHARDS=3)
    body = await not_ready(g3)
    assert "stream HISTORY has 3 messages but HISTORY_SHARDS=3" in body["history_layout"]
    # The same history with the shard count the streams have starts as before.
    assert services("history", fresh_nats, HISTORY_SHARDS=1).ready()


async def test_the_bridge_relays_rooms_of_every_shard(
    fresh_nats: NatsServer, redis_server: RedisServer, services: ServiceFactory
) -> None:
    services("history", fresh_nats, HISTORY_SHARDS=SHARDS)
    await start_bridges(services, fresh_nats, redis_server)
    g = services("gateway", fresh_nats, HISTORY_SHARDS=SHARDS)
    for room in rooms_in_every_shard(1):
        alice = await Client.open(g.ws_url, "alice")
        await alice.join(room)
        async with redis_room(redis_server, room) as old_server:
            await alice.send("chat.message", room=room, text=f"to redis {room}")
            await old_server.wait_texts([f"to redis {room}"])
            redis_cli(redis_server, "publish", f"room:{room}", f"from redis {room}")
            await alice.wait_texts([f"to redis {room}", f"from redis {room}"], room)
            assert alice.texts(room) == [f"to redis {room}", f"from redis {room}"]
            await old_server.wait_texts([f"from redis {room}"])
            assert old_server.texts() == [f"to redis {room}", f"from redis {room}"]
        stored = await stored_messages(fresh_nats.url, room, SHARDS)
        assert [m["text"] for m in stored] == [f"to redis {room}", f"from redis {room}"]
        await alice.close()
