"""The history service: store every message once (the stream's order is the order), answer
history queries by sequence."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from litestar import Litestar
from nats.aio.msg import Msg
from nats.js.errors import APIError
from pydantic import ValidationError

from proto import subjects
from proto.bus import ChatMessage, DirectMessage, parse_bus_direct, stamp_bus_chat
from proto.errors import ErrorCode
from proto.redis import ORIGIN_HEADER
from proto.shards import INBOX_SHARD
from proto.svc import PAGE_BYTES_MAX, HistoryPage, HistoryQuery, InboxQuery, StoreAck, service_error
from services.bus import Bus, connect
from services.jetstream import note_storage_refusal
from services.lifecycle import Shutdown
from services.logs import Malformed, RateLimitedLog
from services.shards import LayoutError
from services.streamread import Stored, StreamReader

from . import metrics
from .settings import HistorySettings
from .store import Store, Window

log = logging.getLogger("roombus.history")

Copy = tuple[str, str | None, bytes]
"""(stream subject, Nats-Msg-Id or None, payload) of one stored copy."""


def with_cursors(raw: list[Stored], first_prev: int) -> list[tuple[int, int, bytes]]:
    """(seq, prev, payload) of messages read in order; ``prev`` links each to the one before."""
    out: list[tuple[int, int, bytes]] = []
    prev = first_prev
    for s in raw:
        out.append((s.seq, prev, s.data))
        prev = s.seq
    return out


M = TypeVar("M", ChatMessage, DirectMessage)


def _validated(rows: list[tuple[int, int, bytes]], model: type[M]) -> list[M]:
    """The stored payloads as ``model`` with their ``seq``/``prev``; what does not parse (written
    straight into the stream by someone else) is counted and left out."""
    out: list[M] = []
    for seq, prev, payload in rows:
        try:
            out.append(
                model.model_validate_json(payload).model_copy(update={"seq": seq, "prev": prev})
            )
        except ValidationError:
            metrics.MALFORMED.inc()
    return out


class HistoryService:
    """Queue-group member ``history`` on ``room.*.message``, ``user.*.message`` and the query
    subjects ``svc.history.*`` / ``svc.inbox.*``."""

    def __init__(self, settings: HistorySettings, stopping: Shutdown | None = None) -> None:
        self.settings = settings
        self.stopping = stopping or Shutdown(settings.shutdown_timeout)
        self._bus: Bus | None = None
        self.store: Store | None = None
        self.window: Window | None = None
        self.layout = settings.layout
        self.readers: list[StreamReader] = []
        """One per history stream (shard), by shard."""
        self._slots = asyncio.Semaphore(settings.history_inflight)
        self._query_slots = asyncio.Semaphore(settings.history_query_concurrency)
        self._query_waiting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._badlog = RateLimitedLog(log)
        self._malformed = Malformed(self._badlog, lambda _kind: metrics.MALFORMED.inc())
        self.accepting = True

    def ready(self) -> tuple[bool, dict[str, Any]]:
        connected = self._bus is not None and self._bus.connected
        ok = connected and self.store is not None and self.accepting
        return ok, {"nats": connected, "provisioned": self.store is not None}

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Litestar) -> AsyncIterator[None]:
        self._bus = bus = await connect(self.settings, "history")
        store = Store(bus.js, self.settings)
        try:
            await store.provision()
        except LayoutError as exc:  # one clear line before uvicorn's traceback
            log.error("refusing to start: HISTORY_SHARDS", extra={"problem": str(exc)})
            raise
        self.window = window = Window(bus.nc, self.settings.history_store_timeout)
        await window.start()
        self.store = store
        self.readers = [StreamReader(bus.nc, stream) for stream in self.layout.streams()]
        for reader in self.readers:
            await reader.start()
        for subject, cb in (
            (subjects.ROOM_MESSAGE_WILDCARD, self.on_message),
            (subjects.USER_MESSAGE_WILDCARD, self.on_direct),
        ):
            await bus.nc.subscribe(
                subject,
                subjects.HISTORY_QUEUE,
                cb=cb,
                pending_msgs_limit=200_000,
                pending_bytes_limit=256 * 1024 * 1024,
            )
        await bus.nc.subscribe(
            subjects.SVC_HISTORY_WILDCARD,
            subjects.HISTORY_QUEUE,
            cb=self._query(self.answer_room),
        )
        await bus.nc.subscribe(
            subjects.SVC_INBOX_WILDCARD,
            subjects.HISTORY_QUEUE,
            cb=self._query(self.answer_inbox),
        )
        await bus.nc.flush()
        log.info(
            "history ready",
            extra={"replicas": self.settings.history_replicas, "shards": self.layout.shards},
        )
        try:
            yield
        finally:
            self.accepting = False
            # Let stores in flight get their acks (their senders are waiting), then drain:
            # all within what is left of the one shutdown deadline.
            await window.stop(self.stopping.left() / 3)
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=self.stopping.left() / 2)
            await bus.drain(self.stopping.left())
            log.info("history stopped")

    # -- intake -----------------------------------------------------------------------
    async def on_message(self, msg: Msg) -> None:
        metrics.RECEIVED.inc()
        room = subjects.parse_room_message(msg.subject)
        if room is not None and self.settings.is_ephemeral(room):
            metrics.EPHEMERAL.inc()  # never stored: the gateways fan it out themselves
            return
        try:
            if room is None:
                raise ValueError("not a room.<room>.message subject")
            chat = stamp_bus_chat(msg.data, room)
        except ValueError as exc:
            self._malformed.drop("bad_payload", subject=msg.subject, error=str(exc))
            return
        # The stored form is canonical: id/ts made here, unknown fields dropped.
        payload = orjson.dumps(chat.model_dump(mode="json", exclude_none=True))
        headers = msg.headers or {}
        key = headers.get("Nats-Msg-Id") or None
        # The bridge marks what it brought in from Redis; the mark travels with the stored
        # (republished) copy, so the bridge never sends it back to Redis.
        origin = headers.get(ORIGIN_HEADER)
        extra = {ORIGIN_HEADER: origin} if origin else None
        shard, subject = self.layout.place(room)
        await self._window_store(chat.id, shard, subject, key, payload, msg.reply, extra)

    async def on_direct(self, msg: Msg) -> None:
        """A direct message: one stored copy in the inbox of each party, the sender's first."""
        metrics.RECEIVED.inc()
        to = subjects.parse_user_message(msg.subject)
        try:
            if to is None:
                raise ValueError("not a user.<id>.message subject")
            dm = parse_bus_direct(msg.data, to)
        except ValueError as exc:
            self._malformed.drop("bad_direct", subject=msg.subject, error=str(exc))
            return
        payload = orjson.dumps(dm.wire())
        key = (msg.headers or {}).get("Nats-Msg-Id") or None
        parties = [dm.sender] if dm.sender != "system" else []
        parties += [dm.to] if dm.to not in parties else []
        copies: list[Copy] = [
            (self.layout.inbox_subject(u), f"{key}:{u}" if key else None, payload) for u in parties
        ]
        await self._spawn_store(dm.id, copies, msg.reply)

    async def _window_store(
        self,
        msg_id: str,
        shard: int,
        subject: str,
        key: str | None,
        payload: bytes,
        reply: str,
        extra: dict[str, str] | None,
    ) -> None:
        """One room message into the window of JetStream publishes in flight: no task, no
        awaited PubAck; the sender's ack (or refusal) goes out when the PubAck arrives."""
        assert self.window is not None
        await self._slots.acquire()  # backpressure: the subscription's pending queue absorbs
        metrics.INFLIGHT.inc()
        headers = {**(extra or {}), **({"Nats-Msg-Id": key} if key else {})} or None

        async def done(seq: int, duplicate: bool, exc: BaseException | None) -> None:
            self._slots.release()
            metrics.INFLIGHT.dec()
            if exc is not None:
                await self._failed(msg_id, reply, exc, shard)
            elif duplicate:  # a retry: acked with the original's id, read from the stream
                task = asyncio.create_task(self._ack_duplicate(msg_id, shard, seq, reply))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                await self._ack(msg_id, seq, False, reply)

        await self.window.publish(subject, payload, headers, done)

    async def _ack_duplicate(self, msg_id: str, shard: int, seq: int, reply: str) -> None:
        try:
            msg_id = await self._original_id(shard, seq) or msg_id
        except Exception as exc:
            await self._failed(msg_id, reply, exc, shard)
            return
        await self._ack(msg_id, seq, True, reply)

    async def _ack(self, msg_id: str, seq: int, duplicate: bool, reply: str) -> None:
        assert self._bus is not None
        (metrics.DUPLICATES if duplicate else metrics.STORED).inc()
        if reply:
            ack = StoreAck(id=msg_id, seq=seq, duplicate=duplicate)
            with contextlib.suppress(Exception):
                await self._bus.nc.publish(reply, orjson.dumps(ack.model_dump()))

    async def _failed(self, msg_id: str, reply: str, exc: BaseException, shard: int) -> None:
        assert self._bus is not None
        metrics.STORE_FAILED.inc()
        if isinstance(exc, APIError):
            if not note_storage_refusal(self.layout.stream(shard), exc):
                # Transient (e.g. "duplicate message id is in process" while a cluster
                # elects): no answer, the sender retries with the same Nats-Msg-Id.
                self._badlog.warning("store_retry", "store not done", error=repr(exc)[:200])
                return
            # No space: the sender is told at once, and why.
            if reply:
                body = service_error(
                    ErrorCode.NOT_STORED, f"storage refused the message: {exc.description}"
                )
                with contextlib.suppress(Exception):
                    await self._bus.nc.publish(reply, orjson.dumps(body))
            return
        # No ack goes back: the sender retries with the same Nats-Msg-Id, and JetStream's
        # duplicate window makes that retry safe even if this store did land.
        self._badlog.warning("store_failed", "store failed", id=msg_id, error=repr(exc)[:200])

    async def _spawn_store(
        self, msg_id: str, copies: list[Copy], reply: str, extra: dict[str, str] | None = None
    ) -> None:
        await self._slots.acquire()  # backpressure: the subscription's pending queue absorbs
        metrics.INFLIGHT.inc()
        task = asyncio.create_task(self._store(msg_id, copies, reply, extra))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store(
        self, msg_id: str, copies: list[Copy], reply: str, extra: dict[str, str] | None
    ) -> None:
        """A direct message's copies (one per party), stored together before the ack."""
        assert self.store is not None
        store = self.store
        try:
            results = await asyncio.gather(*(store.append(s, i, p, extra) for s, i, p in copies))
            seq, duplicate = results[0][0], all(d for _, d in results)
            if duplicate:
                msg_id = await self._original_id(INBOX_SHARD, seq) or msg_id
        except Exception as exc:
            await self._failed(msg_id, reply, exc, INBOX_SHARD)
            return
        finally:
            self._slots.release()
            metrics.INFLIGHT.dec()
        await self._ack(msg_id, seq, duplicate, reply)

    async def _original_id(self, shard: int, seq: int) -> str | None:
        """The id of the message stored at ``seq`` in ``shard``'s stream (a retry is acked
        with the original's id).

        Read from the stream's leader: the PubAck that named ``seq`` came from it, and a
        replica may not have the message yet (a direct read there would miss it and the
        retry would be acked under an id nothing was stored with)."""
        found = await self.readers[shard].get(seq)
        if found is None:
            return None
        try:
            value = orjson.loads(found.data).get("id")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    # -- queries ----------------------------------------------------------------------
    def _query(
        self, answer: Callable[[str, bytes], Awaitable[dict[str, Any]]]
    ) -> Callable[[Msg], Awaitable[None]]:
        """A query callback: each query in a task of its own, at most
        ``history_query_concurrency`` at once, dropped once its requester gave up."""

        async def on_query(msg: Msg) -> None:
            if not msg.reply:
                return
            if self._query_waiting >= self.settings.history_query_backlog:
                metrics.QUERIES.labels("any", "overloaded").inc()
                body = service_error(ErrorCode.UNAVAILABLE, "history is overloaded, retry")
                with contextlib.suppress(Exception):
                    await msg.respond(orjson.dumps(body))
                return
            self._query_waiting += 1
            task = asyncio.create_task(self._run_query(answer, msg, time.monotonic()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return on_query

    async def _run_query(
        self, answer: Callable[[str, bytes], Awaitable[dict[str, Any]]], msg: Msg, since: float
    ) -> None:
        try:
            left = self.settings.history_query_deadline - (time.monotonic() - since)
            async with asyncio.timeout(max(0.0, left)):
                await self._query_slots.acquire()
        except TimeoutError:
            metrics.QUERIES.labels("any", "abandoned").inc()
            return  # the requester gave up waiting: reading it now would help nobody
        finally:
            self._query_waiting -= 1
        start = time.perf_counter()
        try:
            body = await answer(msg.subject, msg.data)
        except (ValidationError, ValueError) as exc:
            metrics.QUERIES.labels("any", "invalid").inc()
            body = service_error(ErrorCode.INVALID, str(exc).splitlines()[0][:300])
        except Exception as exc:
            metrics.QUERIES.labels("any", "error").inc()
            self._badlog.warning("query_failed", "history query failed", error=repr(exc)[:300])
            body = service_error(ErrorCode.UNAVAILABLE, "history could not be read")
        finally:
            self._query_slots.release()
        metrics.QUERY_SECONDS.observe(time.perf_counter() - start)
        try:
            await msg.respond(orjson.dumps(body))
        except Exception as exc:  # e.g. over the server's max_payload
            metrics.QUERIES.labels("any", "reply_failed").inc()
            self._badlog.warning("reply_failed", "history reply failed", error=repr(exc)[:200])
            body = service_error(ErrorCode.UNAVAILABLE, "the page could not be sent; ask less")
            with contextlib.suppress(Exception):
                await msg.respond(orjson.dumps(body))

    async def _page(
        self, shard: int, subject: str, before: int | None, after: int | None, limit: int
    ) -> tuple[list[tuple[int, int, bytes]], bool]:
        reader = self.readers[shard]
        budget = PAGE_BYTES_MAX - 4096  # room for the envelope
        if after is not None:
            raw, has_more = await reader.after(subject, after, limit, budget)
            return with_cursors(raw, after), has_more
        raw, prev, has_more = await reader.before(subject, before, limit, budget)
        return with_cursors(raw, prev), has_more

    async def answer_room(self, subject: str, data: bytes) -> dict[str, Any]:
        room = subjects.parse_svc_history(subject)
        query = HistoryQuery.model_validate_json(data)
        if room is None or query.room != room:
            raise ValueError("subject room and query room differ")
        shard, stored_on = self.layout.place(room)
        rows, has_more = await self._page(shard, stored_on, query.before, query.after, query.limit)
        msgs = _validated(rows, ChatMessage)
        metrics.QUERIES.labels("after" if query.after is not None else "before", "ok").inc()
        page = HistoryPage(room=room, messages=msgs, has_more=has_more)
        return page.model_dump(mode="json", exclude_none=True)

    async def answer_inbox(self, subject: str, data: bytes) -> dict[str, Any]:
        """``svc.inbox.<user>``: the gateway asks on behalf of its authenticated user only."""
        user = subjects.parse_svc_inbox(subject)
        query = InboxQuery.model_validate_json(data)
        if user is None or query.user != user:
            raise ValueError("subject user and query user differ")
        rows, has_more = await self._page(
            INBOX_SHARD, self.layout.inbox_subject(user), query.before, query.after, query.limit
        )
        dms = [dm.wire() for dm in _validated(rows, DirectMessage)]
        metrics.QUERIES.labels("inbox", "ok").inc()
        return {"user": user, "messages": dms, "has_more": has_more}
