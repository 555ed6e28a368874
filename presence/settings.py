"""Presence service settings."""

from __future__ import annotations

from pydantic import Field

from services.jetstream import PRESENCE_MAX_BYTES_DEFAULT
from services.settings import ServiceSettings


class PresenceSettings(ServiceSettings):
    """Settings of ``roombus presence``."""

    port: int = Field(default=8095, ge=0, le=65535)
    """HTTP port for /healthz, /readyz, /metrics."""
    presence_ttl: float = Field(default=15.0, ge=1, le=3600)
    """The gateways' key TTL (must match theirs); sets how long delete markers are kept."""
    presence_replicas: int | None = Field(default=None, ge=1, le=5)
    """JetStream replicas of the presence buckets; unset: min(3, the cluster's size as the
    server reports it), so 1 on a single server, never lowering an existing bucket's."""
    presence_max_bytes: int = Field(default=PRESENCE_MAX_BYTES_DEFAULT, ge=64 * 1024)
    """Bytes each of the presence and presence_announced buckets may use (JetStream reserves
    them: every bound must fit in the server's max_file_store)."""
