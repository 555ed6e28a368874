"""Settings shared by every service. Environment first, command-line flags override."""

from __future__ import annotations

import fnmatch
from functools import cached_property
from typing import Any, Literal, TypeVar

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from proto.shards import SHARDS_MAX, HistoryLayout

S = TypeVar("S", bound="ServiceSettings")


class NatsSettings(BaseSettings):
    """How a service reaches NATS."""

    model_config = SettingsConfigDict(
        env_prefix="", extra="ignore", use_attribute_docstrings=True, frozen=True
    )

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server URL, or a comma-separated list of cluster nodes to fail over between."""
    nats_reconnect_wait: float = Field(default=0.5, gt=0, le=30)
    """Seconds between reconnect attempts (the client reconnects forever)."""
    nats_reconnect_buffer: int = Field(default=8 * 1024 * 1024, ge=0)
    """Bytes of publishes buffered while disconnected; beyond that a publish fails."""
    nats_connect_timeout: float = Field(default=2.0, gt=0, le=60)
    """Seconds to wait for one connection attempt."""
    jetstream_wait: float = Field(default=60.0, ge=0, le=3600)
    """Seconds a starting service waits for JetStream to become ready (a cluster electing its
    leader) before it gives up provisioning its streams and buckets."""

    @field_validator("nats_url")
    @classmethod
    def _urls(cls, v: str) -> str:
        urls = [u.strip() for u in v.split(",") if u.strip()]
        if not urls or not all(
            u.startswith(("nats://", "tls://", "ws://", "wss://")) for u in urls
        ):
            raise ValueError("NATS_URL must be nats://host:port (comma-separate several)")
        return ",".join(urls)

    @property
    def nats_servers(self) -> list[str]:
        """The URL list handed to the NATS client."""
        return self.nats_url.split(",")


class ServiceSettings(NatsSettings):
    """Settings every service has: its HTTP port (health, metrics), logging, shutdown."""

    host: str = "127.0.0.1"
    """Interface the service's HTTP server binds (0.0.0.0 in containers)."""
    port: int = Field(default=8080, ge=0, le=65535)
    """HTTP port of the service (0 picks a free one)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Minimum level of the structured (JSON lines) log on stderr."""
    shutdown_timeout: float = Field(default=10.0, gt=0, le=300)
    """Hard deadline in seconds for a graceful shutdown, counted from SIGTERM: every phase (SSE
    streams ended, WebSockets closed with 1012, pending acks, the NATS drain) takes a part of
    what is left; a shutdown still running 1 s past it ends the process (exit 1)."""
    instance: str = ""
    """Name of this process in logs and NATS monitoring (default: service-pid)."""
    ephemeral_rooms: str = ""
    """Comma-separated room name patterns (``live-*``) that are never stored: fanned out from
    the raw publish, acked at once, no ``seq`` and no replay. Gateways and history must agree."""

    @cached_property
    def _ephemeral(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.ephemeral_rooms.split(",") if p.strip())

    def is_ephemeral(self, room: str) -> bool:
        """True when ``room`` matches an ``ephemeral_rooms`` pattern."""
        patterns = self._ephemeral
        return bool(patterns) and any(fnmatch.fnmatchcase(room, p) for p in patterns)


class HistoryStreamsSettings(ServiceSettings):
    """Settings every service that writes or reads the history streams shares (history and
    gateways; they must agree)."""

    history_shards: int = Field(default=1, ge=1, le=SHARDS_MAX)
    """History streams the rooms are spread over, each with its own leader (on a cluster,
    JetStream may place them on different nodes). 1: the stream ``HISTORY``. K > 1:
    ``HISTORY_0`` .. ``HISTORY_{K-1}``, a room in shard ``sha256(room)[:8] % K``, inboxes in
    ``HISTORY_0`` (README, "History shards"). Changing it on existing streams is refused;
    history and every gateway must agree."""

    @cached_property
    def layout(self) -> HistoryLayout:
        """Where each room and inbox is stored (``proto.shards``)."""
        return HistoryLayout(self.history_shards)


def settings_from(cls: type[S], overrides: dict[str, Any] | None = None) -> S:
    """Build settings from the environment, with explicit ``overrides`` (flags) winning."""
    return cls(**{k: v for k, v in (overrides or {}).items() if v is not None})
