"""Redis clients of the bridge: no hidden retries, the bridge's own loops reconnect."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .settings import BridgeSettings

# What a Redis outage looks like to the bridge: retried with backoff, never fatal.
REDIS_DOWN = (RedisError, OSError, TimeoutError)


def redis_client(settings: BridgeSettings) -> Redis:
    """A client for ``REDIS_URL`` whose calls fail fast while Redis is down."""
    return Redis.from_url(
        settings.redis_url,
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=5,
        client_name="roombus-bridge",
    )
