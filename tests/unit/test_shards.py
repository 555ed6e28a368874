"""History shards: the room -> shard -> (stream, subject) mapping, the layout check, and a
gateway's rooms over several in-memory streams (each room's seq and epoch are its shard's)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import orjson
import pytest
from pydantic import ValidationError

from gateway.hub import Hub
from gateway.recovery import join_stored
from gateway.settings import GatewaySettings
from gateway.shards import Shards
from history.settings import HistorySettings
from history.store import stream_config
from proto import subjects
from proto.ids import new_id
from proto.shards import SHARDS_METADATA, HistoryLayout, shard_of, stream_shard
from services.memstream import MemoryStream, Published
from services.shards import PresentStream, layout_problem
from tests.unit.test_room_delivery import Client, _msg, _now, soon

if TYPE_CHECKING:
    from gateway.core import Gateway

# Fixed values: a room's shard must never change between processes, releases or languages
# (sha256 of the UTF-8 name, first 8 bytes big-endian, modulo the shard count).
FIXED = {
    ("lobby", 3): 2,
    ("general", 3): 2,
    ("dev", 3): 1,
    ("r0", 3): 1,
    ("lobby", 2): 0,
    ("general", 2): 1,
    ("dev", 7): 4,
}


@pytest.mark.parametrize(("room", "shards"), sorted(FIXED))
def test_a_room_always_lands_in_the_same_shard(room: str, shards: int) -> None:
    assert shard_of(room, shards) == FIXED[room, shards]
    assert HistoryLayout(shards).room_shard(room) == FIXED[room, shards]


def test_the_shard_is_the_documented_hash_not_pythons() -> None:
    import hashlib

    for room, shards in FIXED:
        documented = int(hashlib.sha256(room.encode()).hexdigest()[:16], 16) % shards
        assert shard_of(room, shards) == documented
    # Another interpreter with another hash seed agrees (Python's hash() would not).
    code = "from proto.shards import shard_of; print(shard_of('lobby', 3), shard_of('dev', 7))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["2", "4"]


def test_one_shard_is_exactly_the_single_stream_layout() -> None:
    one = HistoryLayout()
    assert one.streams() == ["HISTORY"]
    assert one.room_subject("lobby") == "history.lobby" == subjects.history("lobby")
    assert one.inbox_subject("alice") == "inbox.alice" == subjects.inbox("alice")
    assert one.stream_subjects(0) == ["history.>", "inbox.>"]
    assert one.republish(0) == (">", "stored.>")
    assert one.locate("history.lobby") == (0, "history.lobby")
    config = stream_config(HistorySettings())
    assert config.name == "HISTORY" and config.subjects == ["history.>", "inbox.>"]
    assert config.republish is not None and config.republish.dest == "stored.>"
    assert config.max_bytes == HistorySettings().history_max_bytes


def test_three_shards_name_their_streams_and_subjects() -> None:
    three = HistoryLayout(3)
    assert three.streams() == ["HISTORY_0", "HISTORY_1", "HISTORY_2"]
    assert three.room_stream("lobby") == "HISTORY_2"
    assert three.room_subject("lobby") == "history.2.lobby"
    assert three.place("lobby") == (2, "history.2.lobby")
    assert three.inbox_subject("alice") == "inbox.0.alice"  # every inbox in shard 0
    assert three.stream_subjects(0) == ["history.0.*", "inbox.0.*"]
    assert three.stream_subjects(2) == ["history.2.*"]
    assert three.republish(1) == ("*.*.*", "stored.{{wildcard(1)}}.{{wildcard(3)}}")
    assert three.locate("history.lobby") == (2, "history.2.lobby")
    assert three.locate("inbox.alice") == (0, "inbox.0.alice")
    assert three.metadata(1) == {SHARDS_METADATA: "3", "roombus.history_shard": "1"}
    # The republished subjects are the single stream's: the key still parses as one.
    assert subjects.parse_history("history.2.lobby") is None
    with pytest.raises(ValueError):
        three.locate("history.2.lobby")
    config = stream_config(HistorySettings(history_shards=3, history_max_bytes=3000), 1)
    assert config.name == "HISTORY_1" and config.subjects == ["history.1.*"]
    assert config.max_bytes == 1000  # the one byte budget, split
    assert config.metadata == three.metadata(1)


def test_many_rooms_spread_over_every_shard() -> None:
    counts = [0, 0, 0]
    for i in range(300):
        counts[shard_of(f"room-{i}", 3)] += 1
    assert all(60 <= c <= 140 for c in counts), counts


def test_stream_names_parse_back_to_their_shard() -> None:
    assert stream_shard("HISTORY") == (True, None)
    assert stream_shard("HISTORY_12") == (True, 12)
    for other in ("HISTORY_", "HISTORY_x", "HISTORY_01", "KV_presence", "history_1"):
        assert stream_shard(other) == (False, None)


def test_a_shard_count_out_of_range_is_refused() -> None:
    for bad in (0, 65):
        with pytest.raises(ValueError):
            HistoryLayout(bad)
        with pytest.raises(ValidationError):
            GatewaySettings(history_shards=bad)


def _present(name: str, messages: int, shards: int | None) -> PresentStream:
    return PresentStream(name, messages, shards)


def test_streams_of_the_configured_layout_are_accepted() -> None:
    assert layout_problem(HistoryLayout(1), []) is None
    assert layout_problem(HistoryLayout(1), [_present("HISTORY", 5, None)]) is None  # pre-shards
    assert layout_problem(HistoryLayout(1), [_present("HISTORY", 5, 1)]) is None
    shards = [_present("HISTORY_0", 3, 3), _present("HISTORY_2", 1, 3)]  # HISTORY_1 is made
    assert layout_problem(HistoryLayout(3), shards) is None


def test_another_layouts_streams_are_refused_naming_both_values() -> None:
    problem = layout_problem(HistoryLayout(3), [_present("HISTORY", 1234, None)])
    assert problem is not None
    assert problem.startswith("stream HISTORY has 1234 messages but HISTORY_SHARDS=3")
    assert "made with HISTORY_SHARDS=1" in problem and "Set HISTORY_SHARDS=1" in problem
    assert "`nats stream rm HISTORY`" in problem
    three = [_present(f"HISTORY_{p}", 10, 3) for p in range(3)]
    problem = layout_problem(HistoryLayout(2), three)
    assert problem is not None
    assert "streams HISTORY_0, HISTORY_1, HISTORY_2 have 30 messages" in problem
    assert "HISTORY_SHARDS=2" in problem and "Set HISTORY_SHARDS=3" in problem
    problem = layout_problem(HistoryLayout(1), three)
    assert problem is not None and "Set HISTORY_SHARDS=3" in problem


class ShardedGw:
    """One gateway's room logic over three in-memory streams (one per shard)."""

    def __init__(self) -> None:
        self.layout = HistoryLayout(3)
        self.streams = [MemoryStream() for _ in range(3)]
        self.shards = Shards(self.layout, self.streams)
        for shard, stream in zip(self.shards.all, self.streams, strict=True):
            shard.epoch = stream.epoch
        self.hub = Hub()
        self.hub.start_feeds(self.streams[0], self.shards.route)
        self.gw = cast(
            "Gateway",
            SimpleNamespace(hub=self.hub, settings=GatewaySettings(), shards=self.shards),
        )

    def say(self, room: str, text: str) -> Published:
        """Stored in the room's shard stream; its republished copy reaches this gateway on
        the single-stream subject (``stored.history.<room>``), as the shard's RePublish does."""
        chat = {"id": new_id(), "room": room, "user": "u", "text": text, "ts": _now()}
        stream = self.streams[self.layout.room_shard(room)]
        p = stream.publish(self.layout.room_subject(room), orjson.dumps(chat))
        republished = Published(p.seq, p.prev, subjects.history(room), p.data)
        self.hub._stored(_msg(republished), "room_message")
        return p

    async def member(self, room: str) -> tuple[Client, dict[str, object]]:
        c = Client(f"u-{room}")
        self.hub.add(c.conn)
        joined = await join_stored(self.gw, c.conn, room, None, None)
        return c, joined


def texts_are(c: Client, texts: list[str]) -> Callable[[], bool]:
    return lambda: c.texts() == texts


def told(c: Client) -> Callable[[], bool]:
    return lambda: any(f["type"] == "joined" for f in c.frames)


ROOMS = {"dev": 1, "lobby": 2, "r2": 1, "random": 2}  # room -> its shard of 3
ROOM0 = "general-4"  # a room of shard 0


async def test_each_room_reads_and_reports_its_own_shard() -> None:
    assert shard_of(ROOM0, 3) == 0 and all(shard_of(r, 3) == p for r, p in ROOMS.items())
    g = ShardedGw()
    g.say("dev", "before")
    members = {room: await g.member(room) for room in [ROOM0, *ROOMS]}
    for room, (_c, joined) in members.items():
        shard = g.streams[shard_of(room, 3)]
        assert joined["epoch"] == shard.epoch
        assert joined["seq"] == (1 if room == "dev" else 0)
    for i in range(3):
        for room in [ROOM0, *ROOMS]:
            g.say(room, f"m{i}")
    for room, (c, _j) in members.items():
        await soon(texts_are(c, ["m0", "m1", "m2"]), f"3 messages in {room}")
        assert c.texts() == ["m0", "m1", "m2"]
        seqs = [m["seq"] for m in c.chats()]
        stream = g.streams[shard_of(room, 3)]
        assert seqs == stream._by_subject[g.layout.room_subject(room)][-3:]
    # Sequences are per shard: rooms of different shards reuse the same numbers.
    assert members["lobby"][0].chats()[0]["seq"] == members[ROOM0][0].chats()[0]["seq"]


async def test_a_recreated_shard_restarts_only_its_rooms() -> None:
    g = ShardedGw()
    members = {room: await g.member(room) for room in [ROOM0, *ROOMS]}
    for room in [ROOM0, *ROOMS]:
        g.say(room, "old")
    shard2 = g.shards.all[2]
    g.streams[2].recreate()
    shard2.epoch = g.streams[2].epoch
    g.hub.reset_epoch(shard2.epoch, shard2.reader)
    for room in ("lobby", "random"):  # shard 2's rooms are told, at the new stream's start
        c = members[room][0]
        await soon(told(c), f"{room} epoch")
        joined = next(f["data"] for f in c.frames if f["type"] == "joined")
        assert joined == {
            "room": room,
            "epoch": shard2.epoch,
            "seq": 0,
            "recovered": False,
            "reason": "epoch",
        }
    for room in [ROOM0, *ROOMS]:
        g.say(room, "new")
    for room, (c, _j) in members.items():
        await soon(texts_are(c, ["old", "new"]), f"the new message in {room}")
    for room in (ROOM0, "dev", "r2"):  # the other shards' rooms went on untouched
        assert not any(f["type"] == "joined" for f in members[room][0].frames)
