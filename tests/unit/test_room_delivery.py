"""A gateway's room logic in-process, against the in-memory stream: the hub, its feeds, the
connections' buffers and the replay, with fake client sinks — no process, no broker.

The stream's order is the oracle: every client sees a room's messages in stream order, each
once, ``prev`` linking each to the one before; or ``recovered: false`` with the reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import orjson
import pytest
from prometheus_client import REGISTRY

from gateway.conn import Conn
from gateway.hub import Hub
from gateway.recovery import join_stored, replay
from gateway.settings import GatewaySettings
from gateway.shards import Shards
from gateway.sinks import AsgiSink
from proto import subjects
from proto.ids import new_id
from proto.shards import HistoryLayout
from services.memstream import MemoryStream, Published
from services.streamread import Reader, StreamReader

if TYPE_CHECKING:
    from gateway.core import Gateway

ROOM = "lobby"
KEY = subjects.history(ROOM)
WAIT = 5.0
"""Seconds a condition may take: each normally holds within a few loop iterations."""


class Client:
    """A connection whose socket is a list: the frames the gateway wrote, decoded."""

    def __init__(self, user: str) -> None:
        self.frames: list[dict[str, Any]] = []
        self.conn = Conn(AsgiSink(self._send), user, True, 10_000, 5.0)
        self.conn.start()

    async def _send(self, message: Any) -> None:
        self.frames.append(orjson.loads(message["text"]))

    def chats(self) -> list[dict[str, Any]]:
        return [f["data"] for f in self.frames if f["type"] == "chat.message"]

    def texts(self) -> list[str]:
        return [c["text"] for c in self.chats()]

    def check_links(self, start: int) -> None:
        """Each message's ``prev`` is the one before it (the first's is ``start``)."""
        prev = start
        for chat in self.chats():
            assert chat["prev"] == prev, self.chats()
            prev = chat["seq"]


class Gw:
    """One gateway's room logic over a :class:`MemoryStream`."""

    def __init__(self, hold_max: int = 10_000, **settings: Any) -> None:
        self.stream = MemoryStream()
        self.hub = Hub(hold_max)
        self.feeds = self.hub.start_feeds(self.stream)
        self.settings = GatewaySettings(**settings)
        shards = Shards(HistoryLayout(1), [self.stream])
        shards.all[0].epoch = self.stream.epoch
        # What recovery reads of the gateway: its hub, settings and streams (one shard).
        self.gw = cast(
            "Gateway", SimpleNamespace(hub=self.hub, settings=self.settings, shards=shards)
        )

    def store(self, text: str, room: str = ROOM) -> Published:
        """Stored; its republished copy is lost (or comes later: :meth:`republish`)."""
        chat = {"id": new_id(), "room": room, "user": "u", "text": text, "ts": _now()}
        return self.stream.publish(subjects.history(room), orjson.dumps(chat))

    def republish(self, p: Published) -> None:
        """The stream's republished copy reaches this gateway."""
        self.hub._stored(_msg(p), "room_message")

    def say(self, text: str, room: str = ROOM) -> Published:
        p = self.store(text, room)
        self.republish(p)
        return p

    async def member(self, user: str) -> Client:
        """A client in the room, live from the room's current position."""
        c = Client(user)
        self.hub.add(c.conn)
        self.hub.join(c.conn, ROOM)
        feed = self.hub.room_feed(ROOM)
        assert feed is not None
        await asyncio.wait_for(feed.ready.wait(), WAIT)
        return c


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _msg(p: Published) -> Any:
    """A NATS message as the stream republishes it (only what the hub reads of one)."""
    headers = {"Nats-Sequence": str(p.seq), "Nats-Last-Sequence": str(p.prev)}
    return SimpleNamespace(
        subject=f"{subjects.STORED_PREFIX}.{p.subject}", headers=headers, data=p.data
    )


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def soon(cond: Callable[[], object], what: str) -> None:
    """Until ``cond()`` holds, running the loop in between (no thread, no sleep-and-hope:
    everything it waits for is a task of this loop); fails after ``WAIT`` seconds."""
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def _settle() -> None:
    """Let every ready task run (writers, healers) until nothing is left to do."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_both_readers_satisfy_the_reader_protocol() -> None:
    readers: list[type[Reader]] = [StreamReader, MemoryStream]
    assert readers  # the check is mypy's: a reader that drifts fails the type check


# -- feeds: gaps and overflow -----------------------------------------------------------


async def test_a_feed_heals_a_gap_from_the_stream_before_anything_newer() -> None:
    g = Gw()
    a = await g.member("a")
    g.say("one")
    lost = g.store("two")  # its republished copy does not arrive (yet)
    g.say("three")  # prev is "two": a gap
    await soon(lambda: a.texts() == ["one", "two", "three"], "the healed room")
    duplicates = _count("roombus_gateway_duplicates_total")
    g.republish(lost)  # the late copy: delivered already
    await _settle()
    assert a.texts() == ["one", "two", "three"]
    assert _count("roombus_gateway_duplicates_total") == duplicates + 1
    a.check_links(0)


async def test_a_feed_that_cannot_read_yet_retries_and_loses_nothing() -> None:
    g = Gw()
    a = await g.member("a")
    g.stream.failures = 2  # the broker is away for two reads
    g.store("one")
    g.say("two")
    await soon(lambda: a.texts() == ["one", "two"], "the heal after the retries")
    assert g.stream.failures == 0
    a.check_links(0)


async def test_a_heal_answered_by_a_replica_behind_reads_again_until_it_has_the_gap() -> None:
    g = Gw()
    a = await g.member("a")
    one = g.say("one")
    behind = _count("roombus_gateway_read_behind_total")
    g.stream.replica_at = one.seq  # the replica answering direct reads has only "one"
    g.store("two")  # its republished copy is lost
    g.say("three")  # links to "two": a gap the replica cannot fill yet
    await soon(lambda: _count("roombus_gateway_read_behind_total") >= behind + 2, "rereads")
    assert a.texts() == ["one"]  # nothing past the gap while it is not filled
    g.stream.replica_at = None  # the replica caught up
    await soon(lambda: a.texts() == ["one", "two", "three"], "the healed room")
    a.check_links(0)


async def test_a_gap_the_leader_no_longer_has_is_skipped_not_waited_on() -> None:
    g = Gw()
    a = await g.member("a")
    one = g.say("one")
    g.stream.replica_at = one.seq
    two = g.store("two")  # lost live, and then expired before anyone read it
    g.stream.expire(before=two.seq + 1)
    g.say("three")
    await soon(lambda: a.texts() == ["one", "three"], "the room past what expired")
    feed = g.hub.room_feed(ROOM)
    assert feed is not None and not feed.busy


async def test_a_message_stored_as_a_feed_starts_whose_live_copy_never_comes_arrives() -> None:
    g = Gw()
    g.feeds.recheck = 0.05
    healed = _count("roombus_gateway_recheck_heals_total")
    a = await g.member("a")
    g.store("lost")  # stored after the feed read its start; its live copy never arrives
    await soon(lambda: a.texts() == ["lost"], "the message, found by the re-check")
    assert _count("roombus_gateway_recheck_heals_total") == healed + 1
    g.say("next")
    await soon(lambda: a.texts() == ["lost", "next"], "then live")
    a.check_links(0)


async def test_live_messages_past_the_hold_bound_are_read_again_not_lost() -> None:
    g = Gw(hold_max=2)
    a = await g.member("a")
    rereads = _count("roombus_gateway_dropped_total", reason="feed_overflow_reread")
    g.stream.pause()  # the heal's read is slow
    g.store("m0")
    g.say("m1")  # a gap: the feed heals and holds what comes meanwhile
    texts = [f"m{i}" for i in range(2, 9)]
    for text in texts:
        g.say(text)
    feed = g.hub.room_feed(ROOM)
    assert feed is not None and feed.overflow and not feed.held
    g.stream.resume()
    want = ["m0", "m1", *texts]
    await soon(lambda: a.texts() == want, "every message, read again")
    await _settle()
    assert a.texts() == want
    assert _count("roombus_gateway_dropped_total", reason="feed_overflow_reread") == rereads + 1
    a.check_links(0)
    assert not feed.busy


# -- replay: merging with live messages -------------------------------------------------


async def _backlog(g: Gw, n: int) -> tuple[Client, list[Published]]:
    a = await g.member("a")
    sent = [g.say(f"m{i}") for i in range(1, n + 1)]
    await soon(lambda: len(a.texts()) == n, "the backlog")
    return a, sent


async def test_a_replay_merges_with_live_messages_that_arrive_while_it_reads() -> None:
    g = Gw()
    _a, sent = await _backlog(g, 5)
    b = Client("b")
    g.hub.add(b.conn)
    since = sent[1].seq  # b saw m1, m2
    joined = await join_stored(g.gw, b.conn, ROOM, since, g.stream.epoch)
    assert joined == {"epoch": g.stream.epoch, "seq": since, "recovered": True}
    g.stream.pause()
    replaying = asyncio.create_task(replay(g.gw, b.conn, ROOM, since))
    await _settle()  # the replay's read is answered with m3..m5 (slowly)
    g.say("m6")  # live meanwhile: held for b, not sent ahead of its replay
    g.say("m7")
    assert b.texts() == [] and len(b.conn.catching[KEY].rows) == 2
    g.stream.resume()
    await asyncio.wait_for(replaying, WAIT)
    assert not b.conn.catching and not b.conn.floor
    g.say("m8")
    want = [f"m{i}" for i in range(3, 9)]
    await soon(lambda: b.texts() == want, "the replay, then live messages")
    await _settle()
    assert b.texts() == want
    b.check_links(since)


async def test_a_replay_answered_by_a_replica_behind_still_reaches_where_the_room_was() -> None:
    g = Gw()
    _a, sent = await _backlog(g, 5)  # the feed delivered m1..m5 before b joins
    b = Client("b")
    g.hub.add(b.conn)
    since = sent[0].seq
    g.stream.replica_at = sent[2].seq  # the replica reading the replay has only m1..m3
    joined = await join_stored(g.gw, b.conn, ROOM, since, None)
    assert joined["recovered"] is True
    behind = _count("roombus_gateway_read_behind_total")
    replaying = asyncio.create_task(replay(g.gw, b.conn, ROOM, since))
    await soon(lambda: _count("roombus_gateway_read_behind_total") > behind, "a reread")
    assert not replaying.done() and b.texts() == ["m2", "m3"]
    g.stream.replica_at = None
    await asyncio.wait_for(replaying, WAIT)
    g.say("m6")
    want = [f"m{i}" for i in range(2, 7)]
    await soon(lambda: b.texts() == want, "the whole replay, then live")
    b.check_links(since)


async def test_a_replay_that_read_ahead_of_the_feed_skips_what_the_feed_repeats() -> None:
    g = Gw()
    a, sent = await _backlog(g, 3)
    ahead = g.store("m4")  # stored; its republished copy has not arrived yet
    b = Client("b")
    g.hub.add(b.conn)
    since = sent[0].seq
    joined = await join_stored(g.gw, b.conn, ROOM, since, None)
    assert joined["recovered"] is True
    await replay(g.gw, b.conn, ROOM, since)  # reads m2..m4: ahead of the feed (m3)
    assert b.conn.floor == {KEY: ahead.seq}
    g.republish(ahead)  # now the feed delivers m4: to a, not again to b
    g.say("m5")
    await soon(lambda: a.texts()[-1:] == ["m5"] and b.texts()[-1:] == ["m5"], "m5")
    await _settle()
    assert a.texts() == ["m1", "m2", "m3", "m4", "m5"]
    assert b.texts() == ["m2", "m3", "m4", "m5"]
    assert not b.conn.floor
    a.check_links(0)
    b.check_links(since)


async def test_a_replay_whose_held_messages_overflow_reads_them_from_the_stream() -> None:
    g = Gw(replay_buffer=100)
    _a, sent = await _backlog(g, 2)
    b = Client("b")
    g.hub.add(b.conn)
    since = sent[0].seq
    await join_stored(g.gw, b.conn, ROOM, since, None)
    g.stream.pause()
    replaying = asyncio.create_task(replay(g.gw, b.conn, ROOM, since))
    await _settle()
    live = [f"live{i}" for i in range(150)]  # more than the 100 held for a replay
    for text in live:
        g.say(text)
    assert b.conn.catching[KEY].overflow
    g.stream.resume()
    await asyncio.wait_for(replaying, WAIT)
    want = ["m2", *live]
    await soon(lambda: b.texts() == want, "the replay, with the overflow read again")
    b.check_links(since)


# -- replay: recovered false, with the reason -------------------------------------------


async def _rejoin(g: Gw, since: int, epoch: str | None = None) -> tuple[Client, dict[str, object]]:
    b = Client("b")
    g.hub.add(b.conn)
    joined = await join_stored(g.gw, b.conn, ROOM, since, epoch)
    assert not b.conn.catching  # nothing held: there is no replay
    return b, joined


async def test_a_cursor_from_another_epoch_is_not_recovered() -> None:
    g = Gw()
    _a, sent = await _backlog(g, 3)
    _b, joined = await _rejoin(g, sent[0].seq, epoch="another")
    assert joined["recovered"] is False and joined["reason"] == "epoch"
    assert joined["seq"] == sent[-1].seq  # where the client stands now: the room's end


async def test_a_cursor_whose_messages_expired_is_not_recovered() -> None:
    g = Gw()
    _a, sent = await _backlog(g, 5)
    g.stream.expire(before=sent[2].seq + 1)  # m1..m3 are gone
    _b, joined = await _rejoin(g, sent[1].seq)
    assert joined["recovered"] is False and joined["reason"] == "expired"
    assert joined["missed"] == 2 and joined["seq"] == sent[-1].seq


async def test_more_missed_messages_than_a_replay_may_send_are_not_recovered() -> None:
    g = Gw(replay_max=3)
    _a, sent = await _backlog(g, 6)
    _b, joined = await _rejoin(g, sent[0].seq)
    assert joined["recovered"] is False and joined["reason"] == "too_many"
    assert joined["missed"] == 5


@pytest.mark.parametrize("where", ["past_the_end", "another_room"])
async def test_a_cursor_that_is_not_a_position_of_the_room_is_a_bad_cursor(where: str) -> None:
    g = Gw()
    _a, sent = await _backlog(g, 2)
    other = g.store("elsewhere", room="other")
    g.say("m3")
    since = 10_000 if where == "past_the_end" else other.seq
    _b, joined = await _rejoin(g, since)
    assert joined["recovered"] is False and joined["reason"] == "bad_cursor"


async def test_a_recreated_stream_restarts_every_room_and_says_so() -> None:
    g = Gw()
    a, _sent = await _backlog(g, 2)
    g.stream.recreate()
    g.hub.reset_epoch(g.stream.epoch)
    await soon(lambda: any(f["type"] == "joined" for f in a.frames), "the epoch announcement")
    joined = next(f["data"] for f in a.frames if f["type"] == "joined")
    assert joined == {
        "room": ROOM,
        "epoch": g.stream.epoch,
        "seq": 0,
        "recovered": False,
        "reason": "epoch",
    }
    g.say("after")  # sequences restart at 1: delivered, not taken for a duplicate
    await soon(lambda: a.texts()[-1:] == ["after"], "the first message of the new stream")


# -- a user's inbox: everything stored after the client was told hello -----------------


def _store_dm(g: Gw, to: str, text: str) -> Published:
    dm = {"id": new_id(), "from": "alice", "to": to, "text": text, "ts": _now()}
    return g.stream.publish(subjects.inbox(to), orjson.dumps(dm))


def _dms(c: Client) -> list[dict[str, Any]]:
    return [f["data"] for f in c.frames if f["type"] == "dm"]


def _inbox_copy(g: Gw, p: Published) -> None:
    g.hub._stored(_msg(p), "user_message")


def _connected(g: Gw, user: str) -> tuple[Client, Any]:
    """A client whose connection was just added (the gateway says hello right after)."""
    c = Client(user)
    g.hub.add(c.conn)
    assert g.feeds is not None
    return c, g.feeds.feeds[subjects.inbox(user)]


async def test_a_dm_stored_while_the_inbox_reads_its_start_arrives_once_when_its_copy_is_late() -> (
    None
):
    g = Gw()
    g.feeds.recheck = 0
    _store_dm(g, "bob", "before")  # stored (and republished) before bob connected
    bob, feed = _connected(g, "bob")
    p = _store_dm(g, "bob", "psst")  # after hello, before the feed's read: in its start
    await asyncio.wait_for(feed.ready.wait(), WAIT)
    assert feed.last == p.seq
    _inbox_copy(g, p)  # the live copy comes after the read
    await soon(lambda: [d["text"] for d in _dms(bob)] == ["psst"], "the DM")
    q = _store_dm(g, "bob", "next")
    _inbox_copy(g, q)
    _inbox_copy(g, p)  # a late repeat is a repeat
    await soon(lambda: len(_dms(bob)) == 2, "the next DM")
    await _settle()
    assert [(d["text"], d["prev"]) for d in _dms(bob)] == [("psst", p.prev), ("next", p.seq)]


async def test_a_dm_whose_copy_is_held_while_the_inbox_reads_its_start_arrives_once() -> None:
    g = Gw()
    g.feeds.recheck = 0
    g.stream.pause()
    bob, feed = _connected(g, "bob")
    ps = [_store_dm(g, "bob", f"d{i}") for i in range(3)]  # in the start the read answers
    await _settle()  # the read is asked (and waits)
    for p in ps:
        _inbox_copy(g, p)  # held while the read waits
    g.stream.resume()
    await asyncio.wait_for(feed.ready.wait(), WAIT)
    await soon(lambda: len(_dms(bob)) == 3, "every DM")
    await _settle()
    assert [d["text"] for d in _dms(bob)] == ["d0", "d1", "d2"]
    assert [d["prev"] for d in _dms(bob)] == [0, ps[0].seq, ps[1].seq]


async def test_a_room_feed_still_drops_a_late_copy_its_start_covers() -> None:
    """A room's members are told its start (``joined``): a message at or before it is not
    theirs to get live (only an inbox's start moves back)."""
    g = Gw()
    g.feeds.recheck = 0
    a = Client("a")
    g.hub.add(a.conn)
    g.hub.join(a.conn, ROOM)
    p = g.store("covered")  # before the feed's read: in its start
    feed = g.hub.room_feed(ROOM)
    assert feed is not None
    await asyncio.wait_for(feed.ready.wait(), WAIT)
    assert feed.last == p.seq
    dups = _count("roombus_gateway_duplicates_total")
    g.republish(p)
    await _settle()
    assert a.texts() == [] and _count("roombus_gateway_duplicates_total") == dups + 1
