"""One ordered feed per room (and per user inbox) with local members: the stream's order,
each message once, gaps healed from the stream without a reconnect.

Stored messages arrive republished by the history stream (the room's shard's) with their
``seq`` and ``prev`` (the previous sequence on the same subject). A feed remembers the last
``seq`` it delivered. A message whose ``prev`` is not that ``seq`` means something was missed
(a NATS blip, a slow subscription, a reconnect): the feed reads the missing range from the
stream and delivers it, in order, before anything newer. Live messages that arrive meanwhile
are held (bounded); when the bound is hit they are dropped and read from the stream instead,
never lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from proto.bus import ChatMessage, DirectMessage
from proto.frames import encode_frame
from services.backoff import Backoff
from services.logs import Malformed, RateLimitedLog
from services.streamread import Reader, ReadError

from . import metrics

log = logging.getLogger("roombus.gateway.feeds")

HEAL_BATCH = 500
HOLD_BYTES = 8 * 1024 * 1024
"""Bytes of live messages one feed holds while it heals; past it they are read again."""
RETRY_MAX = 2.0
RECHECK = 1.0
"""Seconds after a feed started when it reads the stream's end once more: a message stored
just after its start whose live copy never came (in a cluster a new subscription reaches the
other servers a moment later) is delivered then, not when the room's next message shows the
gap."""
BEHIND_MAX = 0.25
"""Seconds at most between the reads again when the replica that answered was behind."""

Row = tuple[int, int, bytes]
"""(seq, prev, encoded client frame)"""
Deliver = Callable[["Feed", int, int, bytes], None]
BeforeRead = Callable[["Feed"], Awaitable[None]]
Route = Callable[[str], tuple[Reader, str]]
"""A feed's key (``history.<room>`` / ``inbox.<user>``) -> (the reader of the stream it is
stored in, its subject there): with history shards, each room's own shard."""


def room_frame(data: bytes, seq: int, prev: int, room: str) -> bytes:
    """The ``chat.message`` frame of a stored payload (validated: the stream is writable by
    anyone on the bus); raises ValueError."""
    msg = ChatMessage.model_validate_json(data)
    if msg.room != room:
        raise ValueError("stored message names another room")
    body = msg.model_dump(mode="json", exclude_none=True)
    body["seq"], body["prev"] = seq, prev
    return encode_frame("chat.message", body)


def inbox_frame(data: bytes, seq: int, prev: int, user: str) -> bytes:
    """The ``dm`` frame of a stored direct-message copy in ``user``'s inbox."""
    dm = DirectMessage.model_validate_json(data)
    if user not in (dm.to, dm.sender):
        raise ValueError("stored direct message is not this user's")
    body = dm.wire()
    body["seq"], body["prev"] = seq, prev
    return encode_frame("dm", body)


class Feed:
    """The ordered delivery of one stream subject (``history.<room>`` / ``inbox.<user>``)."""

    __slots__ = (
        "name",
        "subject",
        "frame",
        "last",
        "busy",
        "held",
        "held_bytes",
        "overflow",
        "ready",
        "closed",
        "task",
        "reader",
        "source",
        "opened_live",
        "provisional",
    )

    def __init__(
        self,
        name: str,
        subject: str,
        frame: Callable[[bytes, int, int, str], bytes],
        reader: Reader,
        source: str,
        opened_live: bool = False,
    ) -> None:
        self.name = name
        """The room (or user) this feed serves."""
        self.subject = subject
        self.frame = frame
        self.last: int | None = None
        """The last ``seq`` delivered to local members (None until the start is read)."""
        self.busy = True
        self.held: list[tuple[int, int, bytes]] = []
        self.held_bytes = 0
        self.overflow = False
        self.ready = asyncio.Event()
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.reader = reader
        """The stream it reads from (with history shards, the room's shard's)."""
        self.source = source
        """The subject it reads there (``subject`` is the republished one less ``stored.``;
        the same with one history stream)."""
        self.opened_live = opened_live
        """Everything whose live copy arrives after the feed opened is delivered (a user's
        inbox: the client was told ``hello`` when it opened, and has no position of its
        own). A room's feed starts where its read says (``joined`` tells the client)."""
        self.provisional = opened_live
        """Nothing delivered yet, and the start may still move back: the read of the stream's
        end (the start) can come after a message stored since the feed opened, whose live
        copy then comes after the read. The first live copy that the start already covers
        moves the start back to just before it."""


class Feeds:
    """Every feed of this gateway, their live intake and their healing."""

    def __init__(
        self,
        reader: Reader,
        deliver: Deliver,
        hold_max: int,
        route: Route | None = None,
        before_read: BeforeRead | None = None,
    ) -> None:
        self.reader = reader
        self.route = route
        self.deliver = deliver
        self.hold_max = hold_max
        self.before_read = before_read
        """Awaited before a feed reads where it starts: until the subscription that brings
        its live messages is sent (what is stored after the read then comes live)."""
        self.feeds: dict[str, Feed] = {}
        self.recheck = RECHECK
        self._badlog = RateLimitedLog(log)
        self._malformed = Malformed(
            self._badlog, lambda kind: metrics.BUS_MALFORMED.labels(kind).inc()
        )

    # -- lifecycle --------------------------------------------------------------------
    def open(
        self,
        key: str,
        name: str,
        subject: str,
        frame: Callable[[bytes, int, int, str], bytes],
        opened_live: bool = False,
    ) -> Feed:
        """The feed ``key``, started (its position read from the stream) when new;
        ``opened_live``: see :attr:`Feed.opened_live`."""
        feed = self.feeds.get(key)
        if feed is None:
            reader, source = (
                self.route(subject) if self.route is not None else (self.reader, subject)
            )
            feed = self.feeds[key] = Feed(name, subject, frame, reader, source, opened_live)
            self._heal(feed)
        return feed

    def close(self, key: str) -> None:
        feed = self.feeds.pop(key, None)
        if feed is not None:
            feed.closed = True
            if feed.task is not None:
                feed.task.cancel()

    def heal_all(self) -> None:
        """After a reconnect: whatever was published meanwhile is read from the stream."""
        for feed in self.feeds.values():
            if not feed.busy:
                feed.busy = True
                self._heal(feed)

    def reset_all(self, reader: Reader | None = None) -> list[Feed]:
        """The stream (``reader``'s; None: every one) was recreated (new epoch): each feed
        reading it starts again at its new end."""
        feeds = [f for f in self.feeds.values() if reader is None or f.reader is reader]
        for feed in feeds:
            if feed.task is not None:
                feed.task.cancel()
            feed.last, feed.busy, feed.held, feed.overflow = None, True, [], False
            feed.held_bytes = 0
            feed.provisional = feed.opened_live
            feed.ready = asyncio.Event()
            self._heal(feed)
        return feeds

    # -- intake -----------------------------------------------------------------------
    def offer(self, key: str, seq: int, prev: int, data: bytes) -> None:
        """A republished message (live): deliver it, hold it, or start healing."""
        feed = self.feeds.get(key)
        if feed is None:
            return
        if feed.busy:
            if feed.overflow:
                return
            if len(feed.held) < self.hold_max and feed.held_bytes + len(data) <= HOLD_BYTES:
                feed.held.append((seq, prev, data))
                feed.held_bytes += len(data)
            else:
                feed.overflow = True  # the healer reads these from the stream instead
                feed.held.clear()
                feed.held_bytes = 0
                metrics.DROPPED.labels("feed_overflow_reread").inc()
            return
        assert feed.last is not None
        if seq <= feed.last:
            if not feed.provisional:
                metrics.DUPLICATES.inc()  # healed already, its live copy came late
                return
            feed.last = prev  # stored after the feed opened, before its start was read
        if prev <= feed.last:
            self._emit(feed, seq, prev, data)
            return
        metrics.GAPS.inc()
        feed.busy = True
        feed.held.append((seq, prev, data))
        self._heal(feed)

    def _emit(self, feed: Feed, seq: int, prev: int, data: bytes) -> None:
        feed.last = seq
        feed.provisional = False
        try:
            frame = feed.frame(data, seq, prev, feed.name)
        except ValueError as exc:
            self._malformed.drop(
                "bad_stored",
                "skipped a malformed stored message",
                metric="stored",
                seq=seq,
                error=str(exc)[:200],
            )
            return
        self.deliver(feed, seq, prev, frame)

    # -- healing ----------------------------------------------------------------------
    def _heal(self, feed: Feed) -> None:
        feed.task = asyncio.create_task(self._healer(feed), name=f"heal-{feed.subject}")

    async def _healer(self, feed: Feed) -> None:
        backoff = Backoff(0.05, RETRY_MAX)
        loop = asyncio.get_running_loop()
        started = loop.time()
        starting = feed.last is None
        while not feed.closed:
            try:
                await self._catch_up(feed)
            except ReadError as exc:
                # NATS is down or the stream has no leader: keep trying while anyone is here.
                self._badlog.warning(
                    "heal_retry", "feed cannot read the stream yet", error=str(exc)
                )
                await asyncio.sleep(backoff.next())
                continue
            metrics.HEAL_SECONDS.observe(loop.time() - started)
            if starting and self.recheck > 0:
                loop.call_later(self.recheck, self._recheck, feed)
            return

    def _recheck(self, feed: Feed) -> None:
        if not feed.closed and not feed.busy:  # (a heal under way reads the stream anyway)
            asyncio.get_running_loop().create_task(self._probe(feed))

    async def _probe(self, feed: Feed) -> None:
        """The stream's end once more; past what the feed delivered: heal."""
        try:
            last = await feed.reader.last(feed.source)
        except ReadError:
            return  # NATS away: its reconnect heals every feed
        if feed.closed or feed.busy or feed.last is None or last <= feed.last:
            return
        metrics.RECHECK_HEALS.inc()
        feed.busy = True
        self._heal(feed)

    async def _catch_up(self, feed: Feed) -> None:
        behind = Backoff(0.005, BEHIND_MAX)
        reader = feed.reader
        while True:
            if feed.last is None:
                if self.before_read is not None:
                    await self.before_read(feed)
                    if feed.closed:
                        return
                feed.last = await reader.last(feed.source)
            else:
                rows, more = await reader.after(feed.source, feed.last, HEAL_BATCH)
                if feed.closed:
                    return
                prev = feed.last
                for row in rows:
                    self._emit(feed, row.seq, prev, row.data)
                    prev = row.seq
                metrics.HEALED.inc(len(rows))
                if more:
                    continue
            # Everything stored up to the read is out; now what was held meanwhile.
            if feed.overflow:
                feed.overflow = False
                continue
            if feed.provisional and feed.held:  # the first live copy: the start moves back
                feed.last = min(feed.last, min(feed.held)[1])
            # The first held message links to one the read did not return: the replica that
            # answered is behind (or the message came after the read), unless the stream's
            # leader says it is gone (expired): then go on from what is there.
            accept = 0
            first = min((r for r in feed.held if r[0] > feed.last), default=None)
            if first is not None and first[1] > feed.last:
                if await reader.get(first[1]) is not None:
                    metrics.READ_BEHIND.inc()
                    await asyncio.sleep(behind.next())
                    continue
                accept = first[0]
            held, feed.held, feed.held_bytes = sorted(feed.held), [], 0
            gap = False
            for i, (seq, prev, data) in enumerate(held):
                if seq <= feed.last:
                    continue
                if prev > feed.last and seq != accept:  # a gap inside what was held
                    feed.held = held[i:] + feed.held
                    feed.held_bytes = sum(len(r[2]) for r in feed.held)
                    gap = True
                    break
                self._emit(feed, seq, prev, data)
            if gap or feed.held:
                continue
            feed.busy = False  # no await since the last check: nothing slipped in between
            feed.ready.set()
            return
