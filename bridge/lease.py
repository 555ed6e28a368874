"""The Redis -> NATS lease: one bridge replica at a time forwards what Redis publishes.

Every replica PSUBSCRIBEs (a warm standby), but only the holder of the lease key forwards.
The holder renews it every third of its TTL. It trusts its lease only until 80% of the
TTL after the renewal it *sent*, so it stops forwarding before the key can expire on the
server and another replica can take it: no window with two forwarders.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.asyncio import Redis

from . import metrics
from .redisconn import REDIS_DOWN

log = logging.getLogger("roombus.bridge.lease")

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
TRUST = 0.8


class Lease:
    """``held`` is True while this replica may forward Redis -> NATS."""

    def __init__(self, redis: Redis, key: str, token: str, ttl: float) -> None:
        self.redis = redis
        self.key = key
        self.token = token
        self.ttl = ttl
        self._valid_until = 0.0
        self.redis_ok = False
        """Whether the last lease call reached Redis."""

    @property
    def held(self) -> bool:
        return time.monotonic() < self._valid_until

    async def tick(self) -> bool:
        """Take or renew the lease (one round trip); returns ``held``."""
        was = self.held
        if not was and self._valid_until:
            log.warning("lease lapsed before its renewal ran: event loop overloaded?")
            self._valid_until = 0.0
        sent = time.monotonic()
        try:
            got = await self.redis.eval(_RENEW, 1, self.key, self.token, int(self.ttl * 1000))
            self.redis_ok = True
        except REDIS_DOWN as exc:
            if self.redis_ok:
                log.warning("redis unreachable for the lease", extra={"error": repr(exc)[:200]})
            self.redis_ok = False
            got = 0
        if got == 1:
            self._valid_until = sent + self.ttl * TRUST
        else:
            # Not renewed, or Redis unreachable: stop at once. Redis may have restarted
            # without the key and another replica may already hold a new one.
            self._valid_until = 0.0
        now = self.held
        if now != was:
            log.info("lease " + ("taken: forwarding Redis -> NATS" if now else "lost: standby"))
        metrics.ACTIVE.set(1 if now else 0)
        return now

    def drop(self) -> None:
        """Stop trusting the lease now (this replica's Redis connection failed)."""
        if self._valid_until:
            self._valid_until = 0.0
            metrics.ACTIVE.set(0)
            log.info("lease dropped: Redis connection lost, standby until it is taken again")

    async def run(self, stop: asyncio.Event) -> None:
        """Renew (or try to take) the lease every third of its TTL until ``stop``."""
        while not stop.is_set():
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.ttl / 3)

    async def release(self) -> None:
        """Give the lease up (clean shutdown): a standby takes over at its next tick."""
        if not self.held:
            return
        self._valid_until = 0.0
        metrics.ACTIVE.set(0)
        with contextlib.suppress(*REDIS_DOWN):
            await self.redis.eval(_RELEASE, 1, self.key, self.token)
            log.info("lease released")
