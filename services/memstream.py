"""An in-memory stream with the reads of :class:`services.streamread.Reader`: the bus seam
for in-process tests (as encode/broadcaster's ``memory://`` backend).

Room logic (feeds, healing, replay, history pages) runs against it in milliseconds, with
the faults a test needs on demand: reads paused (:meth:`MemoryStream.pause`) or failing
(:attr:`MemoryStream.failures`), old messages expired (:meth:`MemoryStream.expire`), the
stream recreated under a new epoch (:meth:`MemoryStream.recreate`). What it does not model
(replicas, the republish's transport) the real-broker tests cover.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from dataclasses import dataclass
from typing import TypeVar

from .streamread import PAGE_BYTES, ReadError, Stored, StreamState, newest_page

T = TypeVar("T")

_epochs = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Published:
    """What the stream republishes for one stored message."""

    seq: int
    prev: int
    """The previous sequence on the same subject (``Nats-Last-Sequence``; 0 for the first)."""
    subject: str
    data: bytes


class MemoryStream:
    """One stream's messages in memory: global sequences, per-subject order, the same answers
    as the JetStream reader."""

    def __init__(self) -> None:
        self._empty()
        self._gate = asyncio.Event()
        self._gate.set()
        self.failures = 0
        """The next this-many reads raise :class:`ReadError` (a broker that is away)."""
        self.reads = 0
        """Reads answered so far (tests check that work was, or was not, done)."""
        self.replica_at: int | None = None
        """When set, the direct reads are answered by a replica that has applied only the
        messages up to this sequence (the leader's :meth:`get` sees everything)."""

    def _empty(self) -> None:
        self.epoch = str(next(_epochs))
        self._seqs: list[int] = []
        self._msgs: dict[int, tuple[str, bytes]] = {}
        self._by_subject: dict[str, list[int]] = {}
        self._last_seq = 0

    # -- writing and faults ------------------------------------------------------------
    def publish(self, subject: str, data: bytes) -> Published:
        """Store ``data`` on ``subject``; what the stream would republish for it."""
        self._last_seq += 1
        seq = self._last_seq
        mine = self._by_subject.setdefault(subject, [])
        prev = mine[-1] if mine else 0
        mine.append(seq)
        self._seqs.append(seq)
        self._msgs[seq] = (subject, data)
        return Published(seq, prev, subject, data)

    def seqs(self, subject: str) -> list[int]:
        """The sequences stored on ``subject`` now, in order."""
        return list(self._by_subject.get(subject, ()))

    def expire(self, before: int) -> None:
        """Drop every message with a sequence below ``before`` (age or size limits)."""
        for seq in [s for s in self._seqs if s < before]:
            subject, _ = self._msgs.pop(seq)
            self._by_subject[subject].remove(seq)
        self._seqs = [s for s in self._seqs if s >= before]

    def recreate(self) -> None:
        """Delete and create the stream again: empty, sequences from 1, a new epoch."""
        self._empty()

    def pause(self) -> None:
        """Answers wait (a slow stream) until :meth:`resume`. An answer is what the stream
        held when it was asked: messages stored meanwhile are not in it (as on the wire)."""
        self._gate.clear()

    def resume(self) -> None:
        self._gate.set()

    async def _answer(self, answer: T) -> T:
        if self.failures > 0:
            self.failures -= 1
            raise ReadError("memory stream: read failed (as asked)")
        self.reads += 1
        await self._gate.wait()
        return answer

    def _mine(self, subject: str) -> list[int]:
        """The sequences of ``subject`` the answering replica has."""
        mine = self._by_subject.get(subject, [])
        if self.replica_at is None:
            return mine
        return mine[: bisect.bisect_right(mine, self.replica_at)]

    def _stored(self, subject: str, seq: int) -> Stored:
        mine = self._mine(subject)
        pending = len(mine) - bisect.bisect_right(mine, seq)
        return Stored(seq=seq, subject=subject, data=self._msgs[seq][1], pending=pending)

    # -- the Reader protocol ----------------------------------------------------------
    async def after(
        self, subject: str, after: int, limit: int, max_bytes: int = PAGE_BYTES
    ) -> tuple[list[Stored], bool]:
        mine = self._mine(subject)
        rest = mine[bisect.bisect_right(mine, after) :]
        out: list[Stored] = []
        size = 0
        for seq in rest[:limit]:
            size += len(self._msgs[seq][1])
            if out and size > max_bytes:
                break
            out.append(self._stored(subject, seq))
        return await self._answer((out, len(out) < len(rest)))

    async def first_from(self, subject: str, seq: int) -> Stored | None:
        mine = self._mine(subject)
        i = bisect.bisect_left(mine, max(1, seq))
        return await self._answer(self._stored(subject, mine[i]) if i < len(mine) else None)

    async def count_from(self, subject: str, seq: int) -> int:
        mine = self._mine(subject)
        return await self._answer(len(mine) - bisect.bisect_left(mine, max(1, seq)))

    async def last(self, subject: str) -> int:
        mine = self._mine(subject)
        return await self._answer(mine[-1] if mine else 0)

    async def before(
        self, subject: str, before: int | None, limit: int, max_bytes: int = PAGE_BYTES
    ) -> tuple[list[Stored], int, bool]:
        mine = self._mine(subject)
        older = mine if before is None else mine[: bisect.bisect_left(mine, before)]
        tail = [self._stored(subject, s) for s in older[-limit - 1 :]]
        return await self._answer(newest_page(tail, limit, max_bytes))

    async def state(self) -> StreamState:
        first = self._seqs[0] if self._seqs else self._last_seq + 1
        return await self._answer(StreamState(self.epoch, first, self._last_seq))

    async def get(self, seq: int) -> Stored | None:
        found = self._msgs.get(seq)
        if found is None:
            return await self._answer(None)
        return await self._answer(Stored(seq=seq, subject=found[0], data=found[1], pending=0))
