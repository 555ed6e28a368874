"""The presence service: watch the ``presence`` bucket, emit join/leave once, answer queries.

Gateways write ``room.user.gateway`` keys with a per-key TTL. Every replica watches the
bucket and folds it into the same state, revision by revision. Before it emits the event
of revision R, a replica moves the (room, user) mark in the ``presence_announced`` bucket
to the new state at R (compare-and-set, see ``ledger``): exactly one replica wins, so each
event goes out once however many replicas run, with no leader election and no failover
gap. A (re)started replica folds the existing entries, then diffs them against the marks
and announces what changed while no replica was watching (a gateway that died, users who
left or came): once each, and nothing when nothing changed.
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
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue, StopIterSentinel
from pydantic import ValidationError

from proto import subjects
from proto.bus import PresenceEvent, utcnow
from proto.errors import ErrorCode
from proto.svc import PresenceMembers, PresenceQuery, service_error
from services.bus import Bus, connect
from services.jetstream import ensure_kv, note_storage_refusal, presence_bucket_config
from services.lifecycle import Shutdown
from services.logs import RateLimitedLog

from . import metrics
from .ledger import Ledger, ledger_config
from .settings import PresenceSettings
from .state import Rooms

log = logging.getLogger("roombus.presence")

KV_DELETES = ("DEL", "PURGE")
FOLD_GRACE = 2.0
"""Seconds the initial fold waits, after nats-py's end marker, for the revision it expects."""
PRESENCE_STREAM = f"KV_{subjects.PRESENCE_BUCKET}"
QUERIES_WAITING_MAX = 1000
"""Queries waiting for the fold at once; past it a query is answered from what is folded."""
QUERY_CATCH_UP = 0.25
"""Seconds a members query may wait for the fold to reach the bucket's revision at the time
it was asked (a join reported just before the query is in the answer)."""


class PresenceService:
    def __init__(self, settings: PresenceSettings, stopping: Shutdown | None = None) -> None:
        self.settings = settings
        self.stopping = stopping or Shutdown(settings.shutdown_timeout)
        self.state = Rooms()
        self._bus: Bus | None = None
        self._ledger: Ledger | None = None
        self._seed = False
        self._synced = False
        self._badlog = RateLimitedLog(log)
        self._watch_task: asyncio.Task[None] | None = None
        self._resync = asyncio.Event()
        self._folded = 0
        self._answering: set[asyncio.Task[None]] = set()
        """The bucket revision the live state includes."""
        self._moved = asyncio.Event()
        """Set (and replaced) each time ``_folded`` moves."""

    def ready(self) -> tuple[bool, dict[str, Any]]:
        connected = self._bus is not None and self._bus.connected
        return connected and self._synced, {"nats": connected, "synced": self._synced}

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Litestar) -> AsyncIterator[None]:
        self._bus = bus = await connect(self.settings, "presence")
        ttl = max(1, round(self.settings.presence_ttl))
        wait = self.settings.jetstream_wait
        replicas, max_bytes = self.settings.presence_replicas, self.settings.presence_max_bytes
        kv = await ensure_kv(
            bus.js, presence_bucket_config(replicas, ttl * 4, max_bytes), wait, owner=True
        )
        try:
            await bus.js.key_value(subjects.PRESENCE_ANNOUNCED_BUCKET)
        except BucketNotFoundError:
            # First start with a ledger (a new deployment, or an upgrade): record who is
            # present without announcing them; they were announced when they came.
            self._seed = True
        ledger_kv = await ensure_kv(bus.js, ledger_config(replicas, max_bytes), wait, owner=True)
        self._ledger = Ledger(bus.js, ledger_kv, absent_ttl=max(60.0, ttl * 20))
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
            await bus.drain(self.stopping.left())
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
                exc = watch.exception()
                if exc is None or not note_storage_refusal(
                    f"KV_{subjects.PRESENCE_ANNOUNCED_BUCKET}", exc
                ):
                    self._badlog.warning("watch_failed", "presence watch failed", error=repr(exc))
                # Watching again folds the bucket and diffs it against what was announced:
                # whatever this failure kept from being announced goes out then.
                await asyncio.sleep(1)

    async def _watch(self, kv: KeyValue) -> None:
        assert self._bus is not None
        fresh = Rooms()
        initial = True
        # Every revision up to here is in the initial fold: the fold is the state as of it.
        folded_rev = (await self._bus.js.stream_info(PRESENCE_STREAM)).state.last_seq or 0
        # The bucket's last revision before the watch: the initial fold is complete only once
        # it has been seen (nats-py's end-of-initial-values marker can come early under load,
        # and a fold cut short would announce leaves nobody made).
        target_rev, seen_rev, marker = folded_rev, 0, False
        watcher = await kv.watchall()
        try:
            while True:
                # After the marker, wait a little for the rest of the fold (the revision the
                # stream had reached): past FOLD_GRACE, go on with what is folded (that
                # revision may be gone: an expired delete marker).
                early = initial and marker and seen_rev < target_rev
                try:
                    entry = await watcher.updates(  # type: ignore[no-untyped-call]
                        timeout=FOLD_GRACE if early else 3600
                    )
                except NatsTimeoutError:
                    if not early:
                        continue
                    entry, seen_rev = None, target_rev
                if isinstance(entry, StopIterSentinel):
                    return
                if entry is None:
                    marker = True
                else:
                    seen_rev = max(seen_rev, entry.revision or 0)
                    await self._fold(entry, fresh if initial else self.state, initial)
                    if initial:
                        folded_rev = max(folded_rev, entry.revision or 0)
                    else:
                        self._advance(seen_rev)
                if initial and marker and seen_rev >= target_rev:
                    # The current state is folded: announce the difference.
                    initial = False
                    self.state = fresh
                    await self._reconcile(fresh, folded_rev)
                    self._synced = True
                    self._advance(max(seen_rev, folded_rev))
                    metrics.ROOMS.set(len(fresh.rooms))
                    log.info("presence state loaded", extra={"rooms": len(fresh.rooms)})
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _advance(self, revision: int) -> None:
        if revision > self._folded:
            self._folded = revision
            moved, self._moved = self._moved, asyncio.Event()
            moved.set()

    async def _caught_up(self, within: float) -> None:
        """Wait (at most ``within``) until the state includes every bucket revision written
        before now: a member reported a moment ago is in the answer, whatever the watch's
        lag. Past the bound, the answer is what is folded (presence converges)."""
        assert self._bus is not None
        try:
            async with asyncio.timeout(within):
                info = await self._bus.js.stream_info(PRESENCE_STREAM)
                target = info.state.last_seq or 0
                while self._folded < target:
                    await self._moved.wait()
        except Exception:  # timed out, or no answer: what is folded is the answer
            metrics.QUERIES_STALE.inc()

    async def _fold(self, entry: KeyValue.Entry, target: Rooms, initial: bool) -> None:
        """One bucket entry into ``target``; once live, its change is announced."""
        parsed = subjects.parse_presence_key(entry.key)
        if parsed is None:
            metrics.MALFORMED.inc()
            self._badlog.warning("bad_key", "ignored presence key", key=entry.key[:200])
            return
        room, user, gateway = parsed
        change: str | None
        if entry.operation in KV_DELETES:
            change = target.remove(room, user, gateway)
        else:
            change = target.put(room, user, gateway)
        if not initial and change is not None and entry.revision is not None:
            await self._emit(change, room, user, entry.revision)

    async def _reconcile(self, state: Rooms, rev: int) -> None:
        """Announce the joins and leaves between the last announced state and ``state``."""
        assert self._ledger is not None
        announced = await self._ledger.present()
        live = {(room, user) for room, users in state.rooms.items() for user in users}
        seed, self._seed = self._seed, False
        changes = [("leave", key) for key in sorted(announced.keys() - live)]
        changes += [("join", key) for key in sorted(live - announced.keys())]
        for kind, (room, user) in changes:
            if seed:
                await self._ledger.claim(room, user, kind == "join", rev)
                metrics.EVENTS.labels(kind, "seeded").inc()
            elif await self._emit(kind, room, user, rev):
                metrics.RECONCILED.labels(kind).inc()
        if changes:
            log.info(
                "presence reconciled with the announced state",
                extra={"changes": len(changes), "seeded": seed, "revision": rev},
            )

    async def _emit(self, kind: str, room: str, user: str, revision: int) -> bool:
        """Announce ``kind`` unless another replica did (or a newer revision is recorded)."""
        assert self._ledger is not None and self._bus is not None
        if not await self._ledger.claim(room, user, kind == "join", revision):
            metrics.EVENTS.labels(kind, "claimed_elsewhere").inc()
            return False
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
        return True

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
            elif len(self._answering) < QUERIES_WAITING_MAX:
                # Answered from a task of its own: the wait for the fold must not hold up the
                # queries behind it (a subscription's callbacks run one at a time).
                task = asyncio.create_task(self._answer(msg, room))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)
                return
            else:  # too many waiting already: what is folded now
                metrics.QUERIES_STALE.inc()
                body = self._members(room)
        except (ValidationError, ValueError) as exc:
            body = service_error(ErrorCode.INVALID, str(exc).splitlines()[0][:300])
        await self._respond(msg, body)

    async def _answer(self, msg: Msg, room: str) -> None:
        await self._caught_up(QUERY_CATCH_UP)
        await self._respond(msg, self._members(room))

    def _members(self, room: str) -> dict[str, Any]:
        members = self.state.members(room)
        return PresenceMembers(room=room, members=members, count=len(members)).model_dump()

    async def _respond(self, msg: Msg, body: dict[str, Any]) -> None:
        metrics.QUERIES.inc()
        with contextlib.suppress(Exception):
            await msg.respond(orjson.dumps(body))
