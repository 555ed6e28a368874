"""The presence service: watch the ``presence`` bucket, emit join/leave once, answer queries.

Gateways write ``room.user.gateway`` keys with a per-key TTL. Every replica watches the
bucket and folds it into the same state, revision by revision. Before it emits the event
of revision R, a replica claims R by creating key R in the ``presence_events`` bucket:
exactly one replica wins, so each event goes out once however many replicas run, with no
leader election and no failover gap. A (re)started replica folds the existing entries
silently: no spurious leaves or joins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from litestar import Litestar
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from proto import subjects
from proto.bus import PresenceEvent, utcnow
from proto.errors import ErrorCode
from proto.svc import PresenceMembers, PresenceQuery, service_error
from services.bus import Bus, connect
from services.jetstream import REPLICAS_DEFAULT, ensure_kv, presence_bucket_config
from services.logs import RateLimitedLog

from . import metrics
from .settings import PresenceSettings
from .state import Rooms

log = logging.getLogger("roombus.presence")

KV_DELETES = ("DEL", "PURGE")


class PresenceService:
    def __init__(self, settings: PresenceSettings) -> None:
        self.settings = settings
        self.state = Rooms()
        self._bus: Bus | None = None
        self._claims: KeyValue | None = None
        self._synced = False
        self._badlog = RateLimitedLog(log)
        self._watch_task: asyncio.Task[None] | None = None
        self._resync = asyncio.Event()

    def ready(self) -> tuple[bool, dict[str, Any]]:
        connected = self._bus is not None and self._bus.connected
        return connected and self._synced, {"nats": connected, "synced": self._synced}

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Litestar) -> AsyncIterator[None]:
        self._bus = bus = await connect(self.settings, "presence")
        ttl = max(1, round(self.settings.presence_ttl))
        wait = self.settings.jetstream_wait
        kv = await ensure_kv(
            bus.js, presence_bucket_config(self.settings.presence_replicas, ttl * 4), wait
        )
        self._claims = await ensure_kv(
            bus.js,
            KeyValueConfig(
                bucket=subjects.PRESENCE_CLAIMS_BUCKET,
                description="which presence replica emitted the event of a revision",
                history=1,
                ttl=300,
                storage=StorageType.FILE,
                replicas=self.settings.presence_replicas or REPLICAS_DEFAULT,
            ),
            wait,
        )
        bus.nc._reconnected_cb = self._chain_reconnect(bus.nc._reconnected_cb)
        self._watch_task = asyncio.create_task(self._watch_forever(kv), name="presence-watch")
        await bus.nc.subscribe(
            subjects.SVC_PRESENCE_WILDCARD, queue=subjects.PRESENCE_QUEUE, cb=self.on_query
        )
        await bus.nc.flush()
        log.info("presence ready")
        try:
            yield
        finally:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
            await bus.drain(self.settings.shutdown_timeout / 2)
            log.info("presence stopped")

    def _chain_reconnect(self, previous: Any) -> Any:
        async def reconnected() -> None:
            if previous is not None:
                await previous()
            # An ordered watcher may not notice a broker restart: fold the bucket again.
            self._resync.set()

        return reconnected

    # -- watching ---------------------------------------------------------------------
    async def _watch_forever(self, kv: KeyValue) -> None:
        while True:
            self._resync.clear()
            watch = asyncio.create_task(self._watch(kv))
            resync = asyncio.create_task(self._resync.wait())
            done, _ = await asyncio.wait({watch, resync}, return_when=asyncio.FIRST_COMPLETED)
            for task in (watch, resync):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if watch in done and watch.exception() is None:
                continue
            if watch in done:
                log.warning("presence watch failed", extra={"error": repr(watch.exception())})
                await asyncio.sleep(1)

    async def _watch(self, kv: KeyValue) -> None:
        fresh = Rooms()
        initial = True
        watcher = await kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:  # the current state is folded: from here on, live
                    initial = False
                    self.state = fresh
                    self._synced = True
                    metrics.ROOMS.set(len(fresh.rooms))
                    log.info("presence state loaded", extra={"rooms": len(fresh.rooms)})
                    continue
                parsed = subjects.parse_presence_key(entry.key)
                if parsed is None:
                    metrics.MALFORMED.inc()
                    self._badlog.warning("bad_key", "ignored presence key", key=entry.key[:200])
                    continue
                room, user, gateway = parsed
                target = fresh if initial else self.state
                change: str | None
                if entry.operation in KV_DELETES:
                    change = target.remove(room, user, gateway)
                else:
                    change = target.put(room, user, gateway)
                if change is not None and not initial and entry.revision is not None:
                    await self._emit(change, room, user, entry.revision)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def _emit(self, kind: str, room: str, user: str, revision: int) -> None:
        assert self._claims is not None and self._bus is not None
        try:
            await self._claims.create(f"r{revision}", b"")
        except KeyWrongLastSequenceError:
            metrics.EVENTS.labels(kind, "claimed_elsewhere").inc()
            return
        event = PresenceEvent(
            type="join" if kind == "join" else "leave",
            room=room,
            user=user,
            count=self.state.count(room),
            ts=utcnow(),
        )
        await self._bus.nc.publish(
            subjects.room_presence(room), orjson.dumps(event.model_dump(mode="json"))
        )
        metrics.EVENTS.labels(kind, "emitted").inc()

    # -- queries ----------------------------------------------------------------------
    async def on_query(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            room = subjects.parse_svc_presence(msg.subject)
            query = PresenceQuery.model_validate_json(msg.data)
            if room is None or query.room != room:
                raise ValueError("subject room and query room differ")
            if not self._synced:
                body = service_error(ErrorCode.UNAVAILABLE, "presence is still loading")
            else:
                members = self.state.members(room)
                body = PresenceMembers(room=room, members=members, count=len(members)).model_dump()
        except (ValidationError, ValueError) as exc:
            body = service_error(ErrorCode.INVALID, str(exc).splitlines()[0][:300])
        metrics.QUERIES.inc()
        with contextlib.suppress(Exception):
            await msg.respond(orjson.dumps(body))
