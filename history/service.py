"""The history service: store every room message once, answer history queries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from litestar import Litestar
from nats.aio.msg import Msg
from pydantic import ValidationError

from proto import subjects
from proto.bus import parse_bus_chat
from proto.errors import ErrorCode
from proto.svc import HistoryPage, HistoryQuery, StoreAck, service_error
from services.bus import Bus, connect
from services.logs import RateLimitedLog

from . import metrics
from .settings import HistorySettings
from .store import Store

log = logging.getLogger("roombus.history")


class HistoryService:
    """Queue-group member ``history`` on ``room.*.message`` and ``svc.history.*``."""

    def __init__(self, settings: HistorySettings) -> None:
        self.settings = settings
        self._bus: Bus | None = None
        self.store: Store | None = None
        self._slots = asyncio.Semaphore(settings.history_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._badlog = RateLimitedLog(log)
        self.accepting = True

    def ready(self) -> tuple[bool, dict[str, Any]]:
        connected = self._bus is not None and self._bus.connected
        ok = connected and self.store is not None and self.accepting
        return ok, {"nats": connected, "provisioned": self.store is not None}

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Litestar) -> AsyncIterator[None]:
        self._bus = bus = await connect(self.settings, "history")
        store = Store(bus.js, self.settings)
        await store.provision()
        self.store = store
        await bus.nc.subscribe(
            subjects.ROOM_MESSAGE_WILDCARD,
            queue=subjects.HISTORY_QUEUE,
            cb=self.on_message,
            pending_msgs_limit=200_000,
            pending_bytes_limit=256 * 1024 * 1024,
        )
        await bus.nc.subscribe(
            subjects.SVC_HISTORY_WILDCARD, queue=subjects.HISTORY_QUEUE, cb=self.on_query
        )
        await bus.nc.flush()
        log.info("history ready", extra={"replicas": self.settings.history_replicas})
        try:
            yield
        finally:
            self.accepting = False
            # Let stores in flight get their acks (their senders are waiting), then drain.
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=self.settings.shutdown_timeout / 2)
            await bus.drain(self.settings.shutdown_timeout / 2)
            log.info("history stopped")

    # -- intake -----------------------------------------------------------------------
    async def on_message(self, msg: Msg) -> None:
        metrics.RECEIVED.inc()
        room = subjects.parse_room_message(msg.subject)
        try:
            if room is None:
                raise ValueError("not a room.<room>.message subject")
            chat = parse_bus_chat(msg.data, room)
        except ValueError as exc:
            metrics.MALFORMED.inc()
            self._badlog.warning(
                "bad_payload", "dropped malformed bus message", subject=msg.subject, error=str(exc)
            )
            return
        # The stored form is canonical: id/ts filled in, unknown fields dropped.
        payload = orjson.dumps(chat.model_dump(mode="json", exclude_none=True))
        await self._slots.acquire()  # backpressure: the subscription's pending queue absorbs
        metrics.INFLIGHT.inc()
        task = asyncio.create_task(self._store(chat.id, chat, payload, msg.reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store(self, msg_id: str, chat: Any, payload: bytes, reply: str) -> None:
        assert self.store is not None and self._bus is not None
        try:
            seq, duplicate = await self.store.append(chat, payload)
        except Exception as exc:
            # No ack goes back: the sender retries with the same id, and JetStream's
            # duplicate window makes that retry safe even if this store did land.
            metrics.STORE_FAILED.inc()
            self._badlog.warning("store_failed", "store failed", id=msg_id, error=repr(exc)[:200])
            return
        finally:
            self._slots.release()
            metrics.INFLIGHT.dec()
        (metrics.DUPLICATES if duplicate else metrics.STORED).inc()
        if reply:
            ack = StoreAck(id=msg_id, seq=seq, duplicate=duplicate)
            with contextlib.suppress(Exception):
                await self._bus.nc.publish(reply, orjson.dumps(ack.model_dump()))

    # -- queries ----------------------------------------------------------------------
    async def on_query(self, msg: Msg) -> None:
        if not msg.reply:
            return
        start = time.perf_counter()
        kind = "invalid"
        try:
            room = subjects.parse_svc_history(msg.subject)
            query = HistoryQuery.model_validate_json(msg.data)
            if room is None or query.room != room:
                raise ValueError("subject room and query room differ")
            kind = "after" if query.after else "before"
            body = await self.answer(query)
            result = "ok"
        except (ValidationError, ValueError) as exc:
            body = service_error(ErrorCode.INVALID, str(exc).splitlines()[0][:300])
            result = "invalid"
        except Exception as exc:
            log.warning("history query failed", extra={"error": repr(exc)[:300]})
            body = service_error(ErrorCode.UNAVAILABLE, "history could not be read")
            result = "error"
        metrics.QUERIES.labels(kind, result).inc()
        metrics.QUERY_SECONDS.observe(time.perf_counter() - start)
        with contextlib.suppress(Exception):
            await msg.respond(orjson.dumps(body))

    async def answer(self, query: HistoryQuery) -> dict[str, Any]:
        assert self.store is not None
        if query.after is not None:
            msgs, has_more, gap = await self.store.after(query.room, query.after, query.limit)
            page = HistoryPage(room=query.room, messages=msgs, has_more=has_more, gap=gap)
        else:
            msgs, has_more = await self.store.before(query.room, query.before, query.limit)
            page = HistoryPage(room=query.room, messages=msgs, has_more=has_more)
        return page.model_dump(mode="json", exclude_none=True)
