"""The bridge service: its lifespan wires NATS, Redis, the lease and both directions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar

from proto import redis as rproto
from proto import subjects
from services.bus import Bus, connect
from services.lifecycle import Shutdown, TaskGroup

from .inbound import Inbound
from .lease import Lease
from .outbound import Outbound
from .redisconn import redis_client
from .settings import BridgeSettings

log = logging.getLogger("roombus.bridge")


class BridgeService:
    """Redis ``room:<name>`` <-> NATS ``room.<name>.message``, at most once each way."""

    def __init__(self, settings: BridgeSettings, stopping: Shutdown | None = None) -> None:
        self.settings = settings
        self.stopping = stopping or Shutdown(settings.shutdown_timeout)
        self.token = (
            f"{settings.instance or socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        )
        self._bus: Bus | None = None
        self.inbound: Inbound | None = None
        self.outbound: Outbound | None = None
        self.lease: Lease | None = None

    def ready(self) -> tuple[bool, dict[str, Any]]:
        nats_ok = self._bus is not None and self._bus.connected
        redis_ok = (
            self.inbound is not None
            and self.inbound.subscribed
            and self.outbound is not None
            and self.outbound.redis_ok
            and self.lease is not None
            and self.lease.redis_ok
        )
        active = self.lease is not None and self.lease.held
        return nats_ok and redis_ok, {"nats": nats_ok, "redis": redis_ok, "active": active}

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Litestar) -> AsyncIterator[None]:
        settings = self.settings
        stop = asyncio.Event()
        self._bus = bus = await connect(settings, "bridge")
        lease_client = redis_client(settings)
        self.lease = lease = Lease(
            lease_client, rproto.LEASE_KEY, self.token, settings.bridge_lease_ttl
        )
        self.inbound = Inbound(settings, bus, lease)
        self.outbound = outbound = Outbound(settings)
        tasks = TaskGroup()
        await lease.tick()  # a lone bridge forwards from its first message on
        tasks.spawn(lease.run(stop), "lease")
        tasks.spawn(self.inbound.run(stop), "redis-subscriber")
        writer = tasks.spawn(outbound.run(stop), "redis-publisher")
        rooms = settings.rooms
        for subject in (
            # Stored messages, as the stream republishes them: the one order, each once.
            [subjects.STORED_ROOM_WILDCARD]
            if rooms is None
            else [subjects.stored_room(r) for r in rooms]
        ):
            await bus.nc.subscribe(
                subject,
                queue=subjects.BRIDGE_QUEUE,
                cb=outbound.on_nats,
                pending_msgs_limit=200_000,
                pending_bytes_limit=256 * 1024 * 1024,
            )
        await bus.nc.flush()
        log.info(
            "bridge ready",
            extra={"rooms": settings.bridge_rooms, "redis": _redacted(settings.redis_url)},
        )
        try:
            yield
        finally:
            # Every wait takes a part of what is left of the one shutdown deadline.
            stopping = self.stopping
            # Hand the lease over first, so a standby starts forwarding within one tick.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lease.release(), stopping.left() / 4)
            await bus.drain(stopping.left() / 2)  # no new NATS -> Redis messages
            stop.set()
            with contextlib.suppress(TimeoutError):  # flush what is queued for Redis
                await asyncio.wait_for(asyncio.shield(writer), stopping.left() / 2)
            await tasks.cancel_all(stopping.left())
            await lease_client.aclose()
            log.info("bridge stopped")


def _redacted(url: str) -> str:
    """``REDIS_URL`` without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}" if creds or at else url
