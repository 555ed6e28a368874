"""Bridge settings (environment first, ``roombus bridge --flag`` overrides)."""

from __future__ import annotations

from pydantic import Field, field_validator

from proto.names import check_name
from services.settings import ServiceSettings


class BridgeSettings(ServiceSettings):
    """Settings of ``roombus bridge``."""

    port: int = Field(default=8096, ge=0, le=65535)
    """HTTP port for /healthz, /readyz, /metrics."""
    redis_url: str = "redis://127.0.0.1:6379"
    """Redis server the Redis-era servers publish on (``redis://[:password@]host:port/db``)."""
    bridge_rooms: str = "*"
    """Comma-separated rooms to bridge, or ``*`` for every room (``room:*`` <-> ``room.*``)."""
    bridge_user: str = "redis"
    """User shown for plain-text messages from Redis (``redis-cli publish room:x hi``)."""
    bridge_lease_ttl: float = Field(default=3.0, ge=0.5, le=60)
    """Seconds the Redis -> NATS lease lives without renewal (renewed every third of it): when
    the active replica dies, another takes over within about this time."""
    bridge_dedupe_ttl: float = Field(default=120.0, ge=1, le=86400)
    """Seconds a message id published to Redis is remembered there, so a retried NATS
    message (same id) reaching another replica is not published twice."""
    bridge_queue: int = Field(default=10_000, ge=10, le=10_000_000)
    """NATS -> Redis messages buffered while Redis is down; beyond, the oldest are dropped."""
    bridge_batch: int = Field(default=256, ge=1, le=10_000)
    """Messages sent to Redis in one pipeline."""
    redis_reconnect_max: float = Field(default=2.0, gt=0, le=60)
    """Longest pause in seconds between Redis reconnect attempts (the backoff starts at 0.1 s and
    doubles, with full jitter)."""

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("REDIS_URL must be redis://host:port[/db] (or rediss://, unix://)")
        return v

    @field_validator("bridge_user")
    @classmethod
    def _user(cls, v: str) -> str:
        return check_name(v, "user")

    @field_validator("bridge_rooms")
    @classmethod
    def _rooms(cls, v: str) -> str:
        rooms = [r.strip() for r in v.split(",") if r.strip()]
        if rooms == ["*"]:
            return "*"
        if not rooms:
            raise ValueError("BRIDGE_ROOMS must be * or a comma-separated list of rooms")
        return ",".join(check_name(r, "room") for r in rooms)

    @property
    def rooms(self) -> list[str] | None:
        """The bridged rooms, or None for all of them."""
        return None if self.bridge_rooms == "*" else self.bridge_rooms.split(",")
