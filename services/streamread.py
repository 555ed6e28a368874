"""Reading a stream by sequence: JetStream batched direct get, work bounded by what is returned.

Every read here but :meth:`StreamReader.get` is a ``$JS.API.DIRECT.GET.<stream>`` request
answered by any replica of the stream (``allow_direct``), with no consumer created and nothing
left behind. A replica may answer a little behind the leader (it applies what the leader
committed a moment later): a read can miss the newest messages, never show a wrong one. Who
must not miss one (a feed healing up to a message it saw, a replay up to where the room was)
asks :meth:`StreamReader.get` (the leader) whether the message it expected exists, and reads
again when it does. Forward reads
(``after``) are one batched request per page. Backward pages (``before``) find where the
page starts with a galloping search over ``Nats-Num-Pending`` counts (``O(log n)`` requests of
one message each), then read the page forwards: no time windows, no scan over a burst.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import nats.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from proto import subjects

READ_TIMEOUT = 2.0
BATCH_MAX = 1000
"""Messages per batched request (the server also stops at ``max_bytes``)."""
PAGE_BYTES = 512 * 1024


class ReadError(RuntimeError):
    """The stream did not answer a read in time, or answered with an unexpected status."""


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored message as read back: its stream sequence, subject and payload."""

    seq: int
    subject: str
    data: bytes
    pending: int
    """Messages on the same subject after this one (at read time)."""


@dataclass(frozen=True, slots=True)
class StreamState:
    epoch: str
    """Stable for the life of the stream (its creation time, in µs): a recreated stream
    restarts its sequences under a new epoch."""
    first_seq: int
    last_seq: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    """The stream's metadata (which history layout and shard it belongs to)."""


class Reader(Protocol):
    """Reads of one stream by sequence: what room logic (feeds, replay, history pages) needs
    of storage. :class:`StreamReader` is the JetStream one; ``services.memstream.MemoryStream``
    the in-memory one that in-process tests run against."""

    async def after(
        self, subject: str, after: int, limit: int, max_bytes: int = PAGE_BYTES
    ) -> tuple[list[Stored], bool]:
        """Up to ``limit`` messages on ``subject`` with ``seq > after``, oldest first, cut at
        ``max_bytes`` (never empty when something matches); (messages, has_more)."""
        ...

    async def first_from(self, subject: str, seq: int) -> Stored | None:
        """The first message on ``subject`` with a sequence >= ``seq``, or None."""
        ...

    async def count_from(self, subject: str, seq: int) -> int:
        """How many messages on ``subject`` have a sequence >= ``seq``."""
        ...

    async def last(self, subject: str) -> int:
        """The sequence of the newest message on ``subject`` (0 when there is none)."""
        ...

    async def before(
        self, subject: str, before: int | None, limit: int, max_bytes: int = PAGE_BYTES
    ) -> tuple[list[Stored], int, bool]:
        """The ``limit`` messages just older than ``before`` (newest page when None), oldest
        first, cut at ``max_bytes`` from the old end; (messages, prev of the first, has_more)."""
        ...

    async def state(self) -> StreamState:
        """The stream's epoch and sequence range."""
        ...

    async def get(self, seq: int) -> Stored | None:
        """The message at ``seq`` as the stream's leader has it, or None (expired, deleted,
        not stored): current, where the other reads may come from a replica behind."""
        ...


def newest_page(older: list[Stored], limit: int, max_bytes: int) -> tuple[list[Stored], int, bool]:
    """The page of a backward read: the newest ``limit`` of ``older`` (oldest first; one more
    before them tells the first one's prev and that there are older ones), cut by bytes from the
    old end. Returns (messages, prev of the first one, has_more)."""
    has_more = len(older) > limit
    page = older[-limit:] if limit else []
    prev = older[-limit - 1].seq if has_more else 0
    size, keep = 0, len(page)
    for i in range(len(page) - 1, -1, -1):
        size += len(page[i].data)
        if size > max_bytes and i < len(page) - 1:
            keep = len(page) - 1 - i
            break
    if keep < len(page):
        prev = page[len(page) - keep - 1].seq
        page = page[len(page) - keep :]
        has_more = True
    return page, prev, has_more


class StreamReader:
    """Direct reads of one stream over the process's NATS connection.

    One wildcard inbox subscription serves every read: each request gets a token of its own
    and a queue its answers land in.
    """

    def __init__(self, nc: NATS, stream: str, timeout: float = READ_TIMEOUT) -> None:
        self.nc = nc
        self.stream = stream
        self.timeout = timeout
        self._prefix = f"_INBOX.rb{secrets.token_hex(8)}"
        self._sub: Subscription | None = None
        self._waiting: dict[str, asyncio.Queue[Msg]] = {}
        self._ids = itertools.count()
        self._api = subjects.direct_get(stream)

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        queue = self._waiting.get(msg.subject[len(self._prefix) + 1 :])
        if queue is not None:
            queue.put_nowait(msg)

    async def _ask(self, subject: str, body: bytes) -> list[Msg]:
        """Send one direct-get request; the answers up to the end of batch (or the only one)."""
        if self._sub is None:
            await self.start()
        token = str(next(self._ids))
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._waiting[token] = queue
        out: list[Msg] = []
        batch = b'"batch"' in body
        try:
            await self.nc.publish(subject, body, reply=f"{self._prefix}.{token}")
            async with asyncio.timeout(self.timeout):
                while True:
                    msg = await queue.get()
                    status = (msg.headers or {}).get("Status")
                    if status == "204":  # end of batch
                        return out
                    if status == "404":  # nothing (more) matches
                        return out
                    if status:
                        desc = (msg.headers or {}).get("Description", "")
                        raise ReadError(f"direct get answered {status} {desc}".strip())
                    out.append(msg)
                    if not batch:
                        return out
        except TimeoutError:
            raise ReadError(f"stream {self.stream} did not answer a read in time") from None
        finally:
            self._waiting.pop(token, None)

    @staticmethod
    def _stored(msg: Msg) -> Stored:
        h = msg.headers or {}
        return Stored(
            seq=int(h.get("Nats-Sequence", 0)),
            subject=h.get("Nats-Subject", ""),
            data=msg.data,
            pending=int(h.get("Nats-Num-Pending", 0)),
        )

    async def after(
        self, subject: str, after: int, limit: int, max_bytes: int = PAGE_BYTES
    ) -> tuple[list[Stored], bool]:
        """Up to ``limit`` messages on ``subject`` with ``seq > after``, oldest first.

        Returns (messages, has_more). A page is cut at ``max_bytes`` too (never empty when
        something matches: the server always sends at least one message).
        """
        out: list[Stored] = []
        start = after + 1
        while len(out) < limit:
            want = min(BATCH_MAX, limit - len(out))
            body = orjson.dumps(
                {"seq": start, "next_by_subj": subject, "batch": want, "max_bytes": max_bytes}
            )
            got = [self._stored(m) for m in await self._ask(self._api, body)]
            if not got:
                return out, False
            out.extend(got)
            if got[-1].pending == 0:
                return out, False
            if len(got) < want:  # cut by bytes
                return out, True
            start = got[-1].seq + 1
        return out, bool(out) and out[-1].pending > 0

    async def first_from(self, subject: str, seq: int) -> Stored | None:
        """The first message on ``subject`` with ``seq`` >= ``seq`` (its ``pending`` counts the
        messages after it), or None."""
        body = orjson.dumps({"seq": max(1, seq), "next_by_subj": subject, "batch": 1})
        got = await self._ask(self._api, body)
        return self._stored(got[0]) if got else None

    async def count_from(self, subject: str, seq: int) -> int:
        """How many messages on ``subject`` have a sequence >= ``seq``."""
        first = await self.first_from(subject, seq)
        return 0 if first is None else first.pending + 1

    async def last(self, subject: str) -> int:
        """The sequence of the newest message on ``subject`` (0 when there is none)."""
        got = await self._ask(subjects.direct_get(self.stream, subject), b"")
        return self._stored(got[0]).seq if got else 0

    async def before(
        self, subject: str, before: int | None, limit: int, max_bytes: int = PAGE_BYTES
    ) -> tuple[list[Stored], int, bool]:
        """The ``limit`` messages on ``subject`` just older than ``before`` (newest page when
        None), oldest first. Returns (messages, prev of the first one, has_more).

        Finds the start with a galloping search on counts, then reads at most ``2 * limit + 1``
        messages forwards.
        """
        if before is None:
            last = await self.last(subject)
            if last == 0:
                return [], 0, False
            before = last + 1
        want = limit + 1  # one more: the first one's prev, and whether there are older ones
        tail = await self.count_from(subject, before)
        total = await self.count_from(subject, 1)
        if total - tail <= want:
            lo = 1  # everything before `before` fits
        else:
            # count(s) = messages in [s, before). Find lo with want <= count(lo) <= 2 * want.
            hi, step = before, want
            lo = max(1, before - step)
            while (await self.count_from(subject, lo)) - tail < want:
                hi, step = lo, step * 4
                lo = max(1, before - step)
            n = (await self.count_from(subject, lo)) - tail
            while n > 2 * want and hi - lo > 1:
                mid = (lo + hi) // 2
                m = (await self.count_from(subject, mid)) - tail
                if m >= want:
                    lo, n = mid, m
                else:
                    hi = mid
        msgs: list[Stored] = []
        start = lo
        while True:
            body = orjson.dumps({"seq": start, "next_by_subj": subject, "batch": 2 * want + 1})
            got = list(map(self._stored, await self._ask(self._api, body)))
            msgs.extend(s for s in got if s.seq < before)
            if not got or got[-1].seq >= before or got[-1].pending == 0:
                break
            start = got[-1].seq + 1
        return newest_page(msgs, limit, max_bytes)

    async def state(self) -> StreamState:
        """The stream's epoch and sequence range (one stream-info request)."""
        try:
            info = await self.nc.jetstream(timeout=self.timeout).stream_info(self.stream)
        except Exception as exc:
            raise ReadError(f"stream {self.stream}: no stream info ({exc!r})") from exc
        created = info.created
        epoch = str(int(created.timestamp() * 1_000_000)) if created else "0"
        return StreamState(
            epoch=epoch,
            first_seq=int(info.state.first_seq),
            last_seq=int(info.state.last_seq),
            metadata=dict(info.config.metadata or {}),
        )

    async def get(self, seq: int) -> Stored | None:
        """The message at ``seq`` as the stream's leader has it, or None when the stream no
        longer (or never) had it. One ``$JS.API.STREAM.MSG.GET`` request: only the leader
        answers, so this is the read to trust after a direct read came back short."""
        try:
            resp = await self.nc.request(
                subjects.msg_get(self.stream), orjson.dumps({"seq": seq}), timeout=self.timeout
            )
            body = orjson.loads(resp.data)
        except (nats.errors.Error, TimeoutError, orjson.JSONDecodeError) as exc:
            raise ReadError(f"stream {self.stream}: no message get ({exc!r})") from exc
        err = body.get("error") if isinstance(body, dict) else None
        if err:
            if err.get("code") == 404:
                return None
            raise ReadError(f"stream {self.stream}: message get answered {err}")
        try:
            m = body["message"]
            data = base64.b64decode(m.get("data") or "")
            return Stored(seq=int(m["seq"]), subject=str(m["subject"]), data=data, pending=0)
        except (KeyError, TypeError, ValueError) as exc:
            raise ReadError(f"stream {self.stream}: bad message get answer ({exc!r})") from exc

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # the connection may be closing already
                pass
            self._sub = None
