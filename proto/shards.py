"""Which history stream holds a room: the room -> shard -> (stream, subject) mapping, in one
place, with no I/O (``HISTORY_SHARDS``; history, gateways and tests all use it).

One shard (the default) is the single-stream layout: stream ``HISTORY``, subjects
``history.<room>`` and ``inbox.<user>``. With ``K > 1`` shards there are ``K`` streams
``HISTORY_0 .. HISTORY_{K-1}``; room ``r`` lives in shard ``p = shard_of(r, K)``, stored on
``history.<p>.<r>`` in ``HISTORY_<p>``; every inbox lives in shard 0 (``inbox.0.<user>`` in
``HISTORY_0``). Each stream republishes to the subjects the single stream uses
(``stored.history.<room>``, ``stored.inbox.<user>``), so subscribers (gateways, the bridge,
``nats sub``) see the same subjects whatever ``K`` is. Sequences, ``prev`` and ``epoch`` are
those of the room's shard stream.

The hash is stable across processes, machines and languages (never Python's ``hash()``):
the first 8 bytes of the SHA-256 digest of the UTF-8 room name, as a big-endian unsigned
integer, modulo ``K``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from . import subjects
from .names import check_name

SHARDS_MAX = 64
"""The most shards a deployment may have (one stream, one Raft group each)."""
INBOX_SHARD = 0
"""The shard every user's inbox (direct messages) lives in."""
SHARDS_METADATA = "roombus.history_shards"
"""Stream metadata key: the ``HISTORY_SHARDS`` a history stream was made for."""
SHARD_METADATA = "roombus.history_shard"
"""Stream metadata key: which shard a history stream is."""


def shard_of(room: str, shards: int) -> int:
    """The shard of ``room`` among ``shards``: ``uint64_be(sha256(utf8(room))[:8]) % shards``."""
    if shards <= 1:
        return 0
    digest = hashlib.sha256(room.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shards


@dataclass(frozen=True, slots=True)
class HistoryLayout:
    """The history streams of a deployment with ``shards`` shards, and where each room (and
    inbox) is stored in them."""

    shards: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.shards, bool) or not 1 <= self.shards <= SHARDS_MAX:
            raise ValueError(f"history shards must be 1 to {SHARDS_MAX}, not {self.shards!r}")

    @property
    def sharded(self) -> bool:
        return self.shards > 1

    # -- streams ------------------------------------------------------------------------
    def stream(self, shard: int) -> str:
        """The stream of ``shard``: ``HISTORY`` with one shard, else ``HISTORY_<shard>``."""
        self._check(shard)
        return subjects.history_stream(shard if self.sharded else None)

    def streams(self) -> list[str]:
        """Every stream of this layout, shard 0 first."""
        return [self.stream(p) for p in range(self.shards)]

    def stream_subjects(self, shard: int) -> list[str]:
        """What shard ``shard``'s stream stores (its ``subjects``)."""
        self._check(shard)
        if not self.sharded:
            return [subjects.HISTORY_WILDCARD, subjects.INBOX_WILDCARD]
        out = [subjects.sharded_history_wildcard(shard)]
        if shard == INBOX_SHARD:
            out.append(subjects.sharded_inbox_wildcard(shard))
        return out

    def republish(self, shard: int) -> tuple[str, str]:
        """(src, dest) of the stream's one RePublish rule: onto ``stored.history.<room>`` /
        ``stored.inbox.<user>`` whatever the layout."""
        self._check(shard)
        if not self.sharded:
            return subjects.REPUBLISH_SOURCE, subjects.REPUBLISH_DEST
        return subjects.SHARDED_REPUBLISH_SOURCE, subjects.SHARDED_REPUBLISH_DEST

    def metadata(self, shard: int) -> dict[str, str]:
        """The stream metadata that says which layout (and shard) a stream belongs to."""
        self._check(shard)
        return {SHARDS_METADATA: str(self.shards), SHARD_METADATA: str(shard)}

    # -- rooms and inboxes --------------------------------------------------------------
    def room_shard(self, room: str) -> int:
        return shard_of(check_name(room, "room"), self.shards)

    def room_subject(self, room: str) -> str:
        """The subject ``room`` is stored on in its shard's stream."""
        return self.place(room)[1]

    def place(self, room: str) -> tuple[int, str]:
        """(shard, stored subject) of ``room``: one hash."""
        if not self.sharded:
            return 0, subjects.history(room)
        shard = self.room_shard(room)
        return shard, subjects.sharded_history(shard, room)

    def room_stream(self, room: str) -> str:
        return self.stream(self.room_shard(room))

    def inbox_subject(self, user: str) -> str:
        """The subject ``user``'s direct messages are stored on (in shard ``INBOX_SHARD``)."""
        if not self.sharded:
            return subjects.inbox(user)
        return subjects.sharded_inbox(INBOX_SHARD, user)

    def locate(self, key: str) -> tuple[int, str]:
        """(shard, stored subject) of a republished key: ``history.<room>`` / ``inbox.<user>``
        (a ``stored.`` subject without its prefix, the one-stream layout's subject)."""
        room = subjects.parse_history(key)
        if room is not None:
            return self.place(room)
        user = subjects.parse_inbox(key)
        if user is not None:
            return INBOX_SHARD, self.inbox_subject(user)
        raise ValueError(f"not a history.<room> or inbox.<user> key: {key!r}")

    def _check(self, shard: int) -> None:
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard {shard} is not one of {self.shards}")


def stream_shard(name: str) -> tuple[bool, int | None]:
    """Whether ``name`` is a history stream name (``HISTORY`` or ``HISTORY_<p>``), and its
    shard (None for ``HISTORY``)."""
    if name == subjects.HISTORY_STREAM:
        return True, None
    shard = subjects.parse_history_stream(name)
    return shard is not None, shard
