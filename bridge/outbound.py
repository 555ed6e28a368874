"""NATS -> Redis: chat messages on ``room.<room>.message`` become Redis-era envelopes.

The NATS side is a queue group, so each message reaches one bridge replica. A retried
message (same id) may reach another replica, so the publish is guarded in Redis itself:
one Lua call sets ``roombus:bridge:sent:<id>`` (NX, with a TTL) and PUBLISHes only when
it was not set before. Batches go out pipelined, in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from nats.aio.msg import Msg
from redis.asyncio import Redis

from proto import redis as rproto
from proto import subjects
from proto.bus import ChatMessage, stored_chat
from services.backoff import Backoff
from services.logs import Malformed, RateLimitedLog
from services.recent import RecentIds

from . import metrics
from .redisconn import REDIS_DOWN, redis_client
from .settings import BridgeSettings

log = logging.getLogger("roombus.bridge.outbound")

DIRECTION = "nats_to_redis"
RECENT_IDS = 65_536
YIELD_EVERY = 32

_PUBLISH_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[3]) then
  return redis.call('PUBLISH', ARGV[1], ARGV[2])
end
return -1
"""


class Outbound:
    """Queue of envelopes for Redis, fed by the NATS subscription, drained by ``run``."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.redis_ok = False
        self._queue: deque[tuple[str, str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._burst = 0
        self._sha: str | None = None
        self._recent: RecentIds[str] = RecentIds(RECENT_IDS)
        self._badlog = RateLimitedLog(log)
        self._malformed = Malformed(
            self._badlog, lambda reason: metrics.DROPPED.labels(DIRECTION, reason).inc()
        )
        self._ttl_ms = int(settings.bridge_dedupe_ttl * 1000)

    async def on_nats(self, msg: Msg) -> None:
        """Subscription callback (queue group ``bridge``)."""
        if (msg.headers or {}).get(rproto.ORIGIN_HEADER) == rproto.ORIGIN_REDIS:
            metrics.DROPPED.labels(DIRECTION, "echo").inc()  # came from Redis: not back
            return
        room = subjects.parse_stored_room(msg.subject)
        chat = self._malformed.parse("bad_payload", msg.subject, lambda: _stored_in(room, msg.data))
        if chat is None or room is None:
            return
        if not self._recent.add(chat.id):  # a retry that reached this replica again
            metrics.DROPPED.labels(DIRECTION, "duplicate").inc()
            return
        while len(self._queue) >= self.settings.bridge_queue and self.redis_ok:
            # Redis is up but slower than NATS: hold the subscription (its pending queue
            # absorbs the burst) until the writer made room.
            self._space.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._space.wait(), 1.0)
        if len(self._queue) >= self.settings.bridge_queue:  # Redis down: keep the newest
            self._queue.popleft()
            metrics.DROPPED.labels(DIRECTION, "overflow").inc()
            self._badlog.warning("overflow", "Redis queue full: dropped the oldest message")
        self._queue.append((rproto.sent_key(chat.id), rproto.channel(room), rproto.envelope(chat)))
        metrics.QUEUED.set(len(self._queue))
        self._wake.set()
        self._burst += 1
        if self._burst >= YIELD_EVERY:
            # Callbacks for queued NATS messages never suspend on their own: let the writer
            # and the lease renewal run under a flood.
            self._burst = 0
            await asyncio.sleep(0)

    async def run(self, stop: asyncio.Event) -> None:
        """Publish queued envelopes to Redis until ``stop``; retry while Redis is down."""
        client = redis_client(self.settings)
        backoff = Backoff(0.1, self.settings.redis_reconnect_max)
        failures = 1  # not known to be up: PING first, so /readyz is right from the start
        try:
            while not stop.is_set() or self._queue:
                if not self._queue:
                    if failures:  # nothing to send: check Redis, so /readyz tells the truth
                        try:
                            await client.ping()
                            self.redis_ok, failures = True, 0
                            backoff.reset()
                        except REDIS_DOWN:
                            await _wait(stop, backoff.next())
                        continue
                    self._wake.clear()
                    await _wait_any(stop, self._wake, 1.0)
                    continue
                if stop.is_set() and not self.redis_ok:
                    break  # shutting down with Redis gone: nothing more can be done
                batch = [
                    self._queue[i] for i in range(min(len(self._queue), self.settings.bridge_batch))
                ]
                try:
                    results = await self._send(client, batch)
                except REDIS_DOWN as exc:
                    self.redis_ok = False
                    failures += 1
                    if failures == 1 or failures % 30 == 0:
                        log.warning(
                            "redis publish failed, will retry",
                            extra={"error": repr(exc)[:200], "queued": len(self._queue)},
                        )
                    await _wait(stop, backoff.next())
                    continue
                if failures:
                    log.info("redis publishing again", extra={"queued": len(self._queue)})
                self.redis_ok, failures = True, 0
                backoff.reset()
                for _ in batch:
                    self._queue.popleft()
                self._space.set()
                metrics.QUEUED.set(len(self._queue))
                sent = sum(1 for r in results if r != -1)
                metrics.FORWARDED.labels(DIRECTION).inc(sent)
                if sent != len(results):
                    metrics.DROPPED.labels(DIRECTION, "duplicate").inc(len(results) - sent)
        finally:
            await client.aclose()

    async def _send(self, client: Redis, batch: list[tuple[str, str, bytes]]) -> list[object]:
        if self._sha is None:  # (re)load after every failure: a restarted Redis forgot it
            self._sha = str(await client.script_load(_PUBLISH_ONCE))
        try:
            async with client.pipeline(transaction=False) as pipe:
                for key, channel, payload in batch:
                    pipe.evalsha(self._sha, 1, key, channel, payload, self._ttl_ms)
                return list(await pipe.execute())
        except BaseException:
            self._sha = None
            raise


async def _wait(stop: asyncio.Event, delay: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except TimeoutError:
        pass


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, within: float) -> None:
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def _stored_in(room: str | None, data: bytes) -> ChatMessage:
    """The stored message republished on ``stored.history.<room>``; ValueError when it is not
    one, or names another room."""
    if room is None:
        raise ValueError("not a stored.history.<room> subject")
    chat = stored_chat(data)
    if chat.room != room:
        raise ValueError("stored message names another room")
    return chat
