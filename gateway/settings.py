"""Gateway settings (environment first, ``roombus gateway --flag`` overrides)."""

from __future__ import annotations

from pydantic import Field

from services.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    """Settings of ``roombus gateway``."""

    port: int = Field(default=8080, ge=0, le=65535)
    """HTTP/WebSocket port of the gateway."""
    allowed_origins: str = "localhost,127.0.0.1,[::1]"
    """Comma-separated hosts (any port) whose pages may open a WebSocket; ``*`` allows all.
    Requests without an ``Origin`` header (backends, CLIs) are not refused for that."""
    max_rooms: int = Field(default=32, ge=1, le=10_000)
    """Rooms one connection may be in at once."""
    max_frame_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    """Largest client frame; a bigger one closes the connection with 1009."""
    text_max: int = Field(default=4000, ge=1, le=4000)
    """Longest chat text, in characters (``text_too_long`` beyond)."""
    send_queue: int = Field(default=1024, ge=8, le=1_000_000)
    """Frames buffered per client; when full, new frames are dropped for that client only."""
    slow_client_timeout: float = Field(default=5.0, gt=0, le=600)
    """Seconds a client's buffer may stay full before it is disconnected (close 4008)."""
    request_timeout: float = Field(default=2.0, gt=0, le=60)
    """Seconds to wait for the history/presence services to answer a query."""
    store_acks: bool = True
    """Publish chat messages as requests and ``ack`` them once the history service stored them;
    retry unacked sends with the same id. Turn off only when no history service runs."""
    ack_timeout: float = Field(default=1.0, gt=0, le=60)
    """Seconds to wait for the first storage ack before retrying (doubles per retry, max 5 s)."""
    ack_deadline: float = Field(default=30.0, gt=0, le=3600)
    """Seconds after which an unacked message is reported ``not_stored`` to its sender."""
    max_inflight: int = Field(default=64, ge=1, le=10_000)
    """Unacked messages per connection; beyond it the gateway stops reading that socket."""
    client_id_ttl: float = Field(default=3600, gt=0)
    """Seconds a ``client_id`` keeps mapping to the same message id (retries across gateways)."""
    replay_buffer: int = Field(default=10_000, ge=100)
    """Live messages held per joining client while its ``since`` replay is read."""
    presence_ttl: float = Field(default=15.0, ge=1, le=3600)
    """Seconds a gateway's presence keys live without a refresh: a dead gateway's users leave
    their rooms within about this time (refreshed every third of it)."""
    presence_replicas: int = Field(default=1, ge=1, le=5)
    """JetStream replicas of the presence bucket (must match the presence service's)."""
    typing_interval: float = Field(default=1.0, ge=0.1, le=60)
    """Seconds between two ``typing`` signals a connection may send for one room."""
    dedupe_window: int = Field(default=65_536, ge=1024, le=10_000_000)
    """Recent message ids remembered to suppress a retried message's second fan-out."""
