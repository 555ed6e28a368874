"""Redis -> NATS: what Redis-era servers and people publish on ``room:<name>``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from proto import redis as rproto
from proto import subjects
from services.backoff import Backoff
from services.bus import Bus
from services.logs import RateLimitedLog

from . import metrics
from .lease import Lease
from .redisconn import REDIS_DOWN, redis_client
from .settings import BridgeSettings

log = logging.getLogger("roombus.bridge.inbound")

DIRECTION = "redis_to_nats"
YIELD_EVERY = 32


class Inbound:
    """Subscribes ``room:*`` (or the configured rooms) and forwards while holding the lease."""

    def __init__(self, settings: BridgeSettings, bus: Bus, lease: Lease) -> None:
        self.settings = settings
        self.bus = bus
        self.lease = lease
        self.subscribed = False
        self._badlog = RateLimitedLog(log)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a subscription up until ``stop``, reconnecting with backoff."""
        backoff = Backoff(0.1, self.settings.redis_reconnect_max)
        failures = 0
        while not stop.is_set():
            client = redis_client(self.settings)
            pubsub = client.pubsub()
            try:
                rooms = self.settings.rooms
                if rooms is None:
                    await pubsub.psubscribe(rproto.ALL_ROOMS_PATTERN)
                else:
                    await pubsub.subscribe(*(rproto.channel(r) for r in rooms))
                burst = 0
                while not stop.is_set():
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None:
                        await self._on_redis(msg, failures)
                        if self.subscribed:
                            failures = 0
                            backoff.reset()
                    burst += 1
                    if burst == YIELD_EVERY:
                        # Buffered messages never suspend get_message: let the lease renew
                        # (and NATS flush) under a flood, or the lease would lapse.
                        burst = 0
                        await asyncio.sleep(0)
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN as exc:
                # Redis may come back without the lease key and another replica may take
                # it before our next renewal: stop forwarding until we hold it again.
                self.lease.drop()
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning(
                        "redis subscription down, reconnecting",
                        extra={"error": repr(exc)[:200], "attempts": failures},
                    )
            finally:
                self._set_subscribed(False)
                await _close(pubsub, client)
            if not stop.is_set():
                await _sleep_or_stop(stop, backoff.next())

    def _set_subscribed(self, value: bool) -> None:
        self.subscribed = value
        metrics.REDIS_CONNECTED.set(1 if value else 0)

    async def _on_redis(self, msg: dict[str, Any], failures: int) -> None:
        kind = msg["type"]
        if kind in (b"subscribe", b"psubscribe", "subscribe", "psubscribe"):
            if not self.subscribed:
                self._set_subscribed(True)
                if failures:
                    metrics.REDIS_RECONNECTS.inc()
                log.info("redis subscribed", extra={"channels": str(msg["channel"])})
            return
        if kind not in (b"message", b"pmessage", "message", "pmessage"):
            return
        await self.forward(msg["channel"], msg["data"])

    async def forward(self, channel: bytes | str, data: bytes | str) -> None:
        """Forward one Redis message to NATS, or drop and count it."""
        if not self.lease.held:
            metrics.DROPPED.labels(DIRECTION, "standby").inc()
            return
        room = rproto.parse_channel(channel)
        if room is None:
            self._drop(rproto.DropReason.BAD_ROOM.value, "bad room channel", channel=channel)
            return
        raw = data.encode() if isinstance(data, str) else data
        try:
            chat = rproto.parse_redis_payload(raw, room, self.settings.bridge_user)
        except rproto.RedisDropError as exc:
            self._drop(exc.reason.value, "dropped Redis payload", channel=channel, error=exc.detail)
            return
        except Exception as exc:  # whatever Redis carries must never stop the subscription
            self._drop("error", "Redis payload not understood", channel=channel, error=repr(exc))
            return
        if chat is None:  # our own envelope, published NATS -> Redis: never back again
            metrics.DROPPED.labels(DIRECTION, "echo").inc()
            return
        payload = orjson.dumps(chat.model_dump(mode="json", exclude_none=True))
        headers = {"Nats-Msg-Id": chat.id, rproto.ORIGIN_HEADER: rproto.ORIGIN_REDIS}
        try:
            await self.bus.nc.publish(subjects.room_message(room), payload, headers=headers)
        except Exception as exc:  # NATS down beyond the reconnect buffer
            self._drop("nats_down", "NATS unavailable, message dropped", error=repr(exc)[:200])
            return
        metrics.FORWARDED.labels(DIRECTION).inc()

    def _drop(self, reason: str, msg: str, **fields: Any) -> None:
        metrics.DROPPED.labels(DIRECTION, reason).inc()
        shown = {
            k: (v[:200].decode(errors="replace") if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        self._badlog.warning(reason, msg, **shown)


async def _close(pubsub: Any, client: Any) -> None:
    for closer in (pubsub.aclose, client.aclose):
        try:
            await asyncio.wait_for(closer(), 2.0)
        except Exception as exc:  # a dead connection may fail to close; it is gone anyway
            log.debug("redis close failed", extra={"error": repr(exc)[:200]})


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except TimeoutError:
        pass
