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
from proto.bus import ChatMessage, DirectMessage, parse_bus_chat, parse_bus_direct
from proto.errors import ErrorCode
from proto.svc import HistoryPage, HistoryQuery, InboxQuery, StoreAck, service_error
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
            subjects.USER_MESSAGE_WILDCARD,
            queue=subjects.HISTORY_QUEUE,
            cb=self.on_direct,
            pending_msgs_limit=200_000,
            pending_bytes_limit=256 * 1024 * 1024,
        )
        await bus.nc.subscribe(
            subjects.SVC_HISTORY_WILDCARD, queue=subjects.HISTORY_QUEUE, cb=self.on_query
        )
        await bus.nc.subscribe(
            subjects.SVC_INBOX_WILDCARD, queue=subjects.HISTORY_QUEUE, cb=self.on_inbox_query
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
        await self._spawn_store(chat.id, [(subjects.history(room), chat.id, payload)], msg.reply)

    async def on_direct(self, msg: Msg) -> None:
        """A direct message: one stored copy in the inbox of each party."""
        metrics.RECEIVED.inc()
        to = subjects.parse_user_message(msg.subject)
        try:
            if to is None:
                raise ValueError("not a user.<id>.message subject")
            dm = parse_bus_direct(msg.data, to)
        except ValueError as exc:
            metrics.MALFORMED.inc()
            self._badlog.warning(
                "bad_direct",
                "dropped malformed direct message",
                subject=msg.subject,
                error=str(exc),
            )
            return
        payload = orjson.dumps(dm.wire())
        parties = {dm.to} | ({dm.sender} if dm.sender != "system" else set())
        copies = [(subjects.inbox(u), f"{dm.id}:{u}", payload) for u in sorted(parties)]
        await self._spawn_store(dm.id, copies, msg.reply)

    async def _spawn_store(
        self, msg_id: str, copies: list[tuple[str, str, bytes]], reply: str
    ) -> None:
        await self._slots.acquire()  # backpressure: the subscription's pending queue absorbs
        metrics.INFLIGHT.inc()
        task = asyncio.create_task(self._store(msg_id, copies, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store(self, msg_id: str, copies: list[tuple[str, str, bytes]], reply: str) -> None:
        assert self.store is not None and self._bus is not None
        store = self.store
        try:
            if len(copies) == 1:  # a room message: no gather (and its extra task)
                results = [await store.append(*copies[0])]
            else:
                results = await asyncio.gather(*(store.append(s, i, p) for s, i, p in copies))
            seq, duplicate = results[0][0], all(d for _, d in results)
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
            body = await self.answer_room(query)
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

    async def answer_room(self, query: HistoryQuery) -> dict[str, Any]:
        assert self.store is not None
        subject = subjects.history(query.room)
        if query.after is not None:
            msgs, has_more, gap = await self.store.after(
                subject, ChatMessage, query.after, query.limit
            )
            page = HistoryPage(room=query.room, messages=msgs, has_more=has_more, gap=gap)
        else:
            msgs, has_more = await self.store.before(
                subject, ChatMessage, query.before, query.limit
            )
            page = HistoryPage(room=query.room, messages=msgs, has_more=has_more)
        return page.model_dump(mode="json", exclude_none=True)

    async def on_inbox_query(self, msg: Msg) -> None:
        """``svc.inbox.<user>``: the gateway asks on behalf of its authenticated user only."""
        if not msg.reply:
            return
        assert self.store is not None
        try:
            user = subjects.parse_svc_inbox(msg.subject)
            query = InboxQuery.model_validate_json(msg.data)
            if user is None or query.user != user:
                raise ValueError("subject user and query user differ")
            subject = subjects.inbox(user)
            gap = False
            if query.after is not None:
                dms, has_more, gap = await self.store.after(
                    subject, DirectMessage, query.after, query.limit
                )
            else:
                dms, has_more = await self.store.before(
                    subject, DirectMessage, query.before, query.limit
                )
            body: dict[str, Any] = {
                "user": user,
                "messages": [d.wire() for d in dms],
                "has_more": has_more,
                "gap": gap,
            }
            metrics.QUERIES.labels("inbox", "ok").inc()
        except (ValidationError, ValueError) as exc:
            body = service_error(ErrorCode.INVALID, str(exc).splitlines()[0][:300])
            metrics.QUERIES.labels("inbox", "invalid").inc()
        except Exception as exc:
            log.warning("inbox query failed", extra={"error": repr(exc)[:300]})
            body = service_error(ErrorCode.UNAVAILABLE, "history could not be read")
            metrics.QUERIES.labels("inbox", "error").inc()
        with contextlib.suppress(Exception):
            await msg.respond(orjson.dumps(body))
