"""Reporting this gateway's room members to the ``presence`` bucket, with a per-key TTL.

Each (room, user) with at least one local connection has the key ``room.user.<gateway>``,
refreshed every ``presence_ttl / 3``. When the last local connection leaves, the key is
deleted; when the gateway dies, its keys expire and the presence service sees the
server's delete markers. The keys are written with core publishes from one ordered
queue: no per-key round-trip, and a join is never overtaken by its own leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from proto import subjects
from services.bus import Bus
from services.jetstream import ensure_kv, presence_bucket_config

from . import metrics

log = logging.getLogger("roombus.gateway.presence")

QUEUE_MAX = 100_000


class PresenceReporter:
    def __init__(self, bus: Bus, gateway: str, ttl: float, replicas: int | None) -> None:
        self.bus = bus
        self.gateway = gateway
        self.ttl = max(1, round(ttl))
        self.replicas = replicas
        self.members: set[tuple[str, str]] = set()
        self._ops: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue(QUEUE_MAX)
        self._tasks: list[asyncio.Task[None]] = []
        self._announced: set[tuple[str, str]] = set()
        """Reported by ``announce``, not yet joined (``join`` does not report them again)."""
        self._queued = 0
        self._written = 0
        self._progress = asyncio.Event()

    async def start(self) -> None:
        await ensure_kv(
            self.bus.js,
            presence_bucket_config(self.replicas, self.ttl * 4),
            self.bus.settings.jetstream_wait,
        )
        self._tasks = [
            asyncio.create_task(self._writer(), name="presence-writer"),
            asyncio.create_task(self._refresher(), name="presence-refresher"),
        ]

    def join(self, room: str, user: str) -> None:
        self.members.add((room, user))
        if (room, user) in self._announced:  # reported a moment ago by ``announce``
            self._announced.discard((room, user))
            return
        self._enqueue("put", room, user)

    async def announce(self, room: str, user: str, within: float) -> None:
        """Report ``user`` in ``room`` now and wait (at most ``within``) until the report is
        on this gateway's NATS connection, ahead of anything it sends next: a join asks for
        the member list after this, so whoever is told ``joined`` is in the bucket before any
        later join asks (the presence service answers once its fold reached the bucket's
        revision at query time). The join that follows (``join``) does not report it again."""
        if (room, user) in self.members:
            return
        self._enqueue("put", room, user)
        self._announced.add((room, user))
        target = self._queued
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self._written < target:
                    await self._progress.wait()

    def leave(self, room: str, user: str) -> None:
        self.members.discard((room, user))
        self._enqueue("del", room, user)

    def _enqueue(self, op: str, room: str, user: str) -> None:
        try:
            self._ops.put_nowait((op, room, user))
            self._queued += 1
        except asyncio.QueueFull:
            # The TTL repairs a lost put (next refresh) and a lost delete (expiry).
            metrics.DROPPED.labels("presence_report").inc()

    async def _writer(self) -> None:
        nc = self.bus.nc
        ttl_header = {"Nats-TTL": str(self.ttl)}
        while True:
            op, room, user = await self._ops.get()
            key = subjects.presence_key(room, user, self.gateway)
            subject = subjects.kv_subject(subjects.PRESENCE_BUCKET, key)
            try:
                if op == "put":
                    await nc.publish(subject, b"1", headers=ttl_header)
                else:
                    await nc.publish(subject, b"", headers={"KV-Operation": "DEL"})
            except Exception as exc:  # disconnected past the buffer: the refresh repairs it
                log.warning("presence report failed", extra={"error": repr(exc)[:200]})
            finally:
                self._ops.task_done()
                self._written += 1
                progress, self._progress = self._progress, asyncio.Event()
                progress.set()

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            # An announced user whose join never followed (the client went away meanwhile)
            # is forgotten here; its key expires with the TTL.
            self._announced.clear()
            for room, user in list(self.members):
                self._enqueue("put", room, user)

    async def stop(self, within: float) -> None:
        """Say goodbye: delete every key of this gateway, then stop the tasks."""
        for room, user in list(self.members):
            self.leave(room, user)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._ops.join()
                await self.bus.nc.flush()
        for task in self._tasks:
            task.cancel()
