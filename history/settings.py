"""History service settings."""

from __future__ import annotations

from pydantic import Field

from services.settings import HistoryStreamsSettings


class HistorySettings(HistoryStreamsSettings):
    """Settings of ``roombus history``."""

    port: int = Field(default=8090, ge=0, le=65535)
    """HTTP port for /healthz, /readyz, /metrics."""
    history_max_age: float = Field(default=30 * 24 * 3600, ge=0)
    """Seconds a message is kept (0 = forever)."""
    history_max_msgs_per_room: int = Field(default=100_000, ge=-1)
    """Messages kept per room; the oldest go first (-1 = unlimited)."""
    history_max_bytes: int = Field(default=1024**3, ge=1)
    """Bytes the history may use (with shards, each stream gets an equal part); the oldest
    messages go first. JetStream reserves them: the bounds of every stream and bucket must fit
    in the server's max_file_store."""
    history_replicas: int | None = Field(default=None, ge=1, le=5)
    """JetStream replicas of each history stream; unset: min(3, the cluster's size as the
    server reports it), so 1 on a single server, never lowering an existing stream's."""
    history_dedupe_window: float = Field(default=600, gt=0, le=86400)
    """The idempotency window, in seconds: a send retried with the same ``client_id`` (same
    user, same room or recipient, through any gateway) within it is stored once and acked with
    the original's ``id`` and ``seq``. After it, a resend is stored again as a new message."""
    history_inflight: int = Field(default=1024, ge=1, le=100_000)
    """Stores awaiting their JetStream ack at once; beyond it intake waits (backpressure)."""
    history_store_timeout: float = Field(default=5.0, gt=0, le=60)
    """Seconds to wait for one JetStream ack before the store counts as failed."""
    history_query_concurrency: int = Field(default=16, ge=1, le=1024)
    """History queries one replica reads at once; more wait their turn."""
    history_query_deadline: float = Field(default=2.0, gt=0, le=60)
    """Seconds a query may wait for its turn; after that its requester has given up and it is
    dropped unread (and counted)."""
    history_query_backlog: int = Field(default=1024, ge=1, le=100_000)
    """Queries waiting for their turn at most; beyond it a query is answered ``unavailable``."""
