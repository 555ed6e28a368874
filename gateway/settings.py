"""Gateway settings (environment first, ``roombus gateway --flag`` overrides)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from services import extras
from services.settings import HistoryStreamsSettings


class GatewaySettings(HistoryStreamsSettings):
    """Settings of ``roombus gateway``."""

    port: int = Field(default=8080, ge=0, le=65535)
    """HTTP/WebSocket port of the gateway."""
    roombus_auth: Literal["none", "jwt"] = "none"
    """``none``: the client names itself (``?user=``, sanitized, shown unverified; development).
    ``jwt``: a signed token's ``sub`` is the user (``?token=`` or a first ``auth`` frame)."""
    jwt_secret: SecretStr | None = None
    """HS256 shared secret (ROOMBUS_AUTH=jwt)."""
    jwt_public_key: str | None = None
    """RS256 public key: PEM text or a path to a PEM file (ROOMBUS_AUTH=jwt)."""
    jwt_audience: str | None = None
    """Required ``aud`` claim, when set."""
    jwt_issuer: str | None = None
    """Required ``iss`` claim, when set."""
    jwt_rooms_claim: str = "rooms"
    """Claim listing the room patterns (``team-*``) the user may join and send to; a token
    without it may use every room."""
    jwt_events_claim: str = "events"
    """Claim listing the event-type patterns (``order.*``) the user may ``subscribe`` to (and
    ask SSE ``events=`` for); a token without it may receive every event type, a token with
    ``[]`` none. A ``null`` value (like a ``null`` rooms claim) is refused (4001)."""
    insecure_dms: bool = False
    """With ``ROOMBUS_AUTH=none`` anyone can claim any name, so ``dm`` and ``dm.history`` are
    refused (``forbidden``) and unverified connections get no direct messages. ``true`` allows
    them anyway: for demos only (``roombus up`` sets it)."""
    jwt_leeway: float = Field(default=5.0, ge=0, le=300)
    """Seconds of clock skew tolerated on ``exp`` / ``nbf``."""
    auth_timeout: float = Field(default=5.0, gt=0, le=120)
    """Seconds a client may take to send its ``auth`` frame when no ``?token=`` was given."""
    allowed_origins: str = "localhost,127.0.0.1,[::1]"
    """Comma-separated hosts (any port) whose pages may open a WebSocket; ``*`` allows all.
    Requests without an ``Origin`` header (backends, CLIs) are not refused for that."""
    max_connections: int = Field(default=20_000, ge=1)
    """Open WebSocket connections per gateway; beyond, new ones are closed with 4029."""
    max_connections_per_ip: int = Field(default=200, ge=1)
    """Open connections per client address; beyond, new ones are closed with 4029."""
    forwarded_allowed_ips: str = ""
    """Comma-separated addresses or networks (``10.0.0.0/8``; ``*`` = any) of the proxies whose
    ``X-Forwarded-For`` / ``X-Forwarded-Proto`` are trusted for the client address (per-address
    limits). Empty: no one's; the client address is the TCP peer."""
    handshake_timeout: float = Field(default=10.0, gt=0, le=300)
    """Seconds a new TCP connection (and each request on a kept-alive one) may take to send its
    complete request headers; then it is dropped (slowloris)."""
    max_pending_per_ip: int = Field(default=100, ge=1)
    """TCP connections per client address that have not yet sent complete request headers;
    beyond, new ones from that address are dropped at once (trusted proxies exempt)."""
    rate_limit: float = Field(default=20.0, gt=0)
    """Frames per second a connection may send (token bucket; ``rate_limited`` beyond)."""
    rate_burst: int = Field(default=40, ge=1)
    """Frames a connection may send in a burst above ``rate_limit``."""
    idle_timeout: float = Field(default=300.0, gt=0)
    """Seconds without any frame from the client before close 4009 (0 < value)."""
    ws_protocol: Literal["direct", "websockets-sansio", "websockets"] = "direct"
    """WebSocket implementation: `direct` is uvicorn's sans-I/O one with fan-out frames
    built once and written straight to each socket; the other two are uvicorn's own
    (every frame through ASGI; `websockets` is the legacy one, ~7 KiB more per idle
    connection)."""
    ws_ping_interval: float = Field(default=20.0, gt=0)
    """Seconds between WebSocket pings the gateway sends."""
    ws_ping_timeout: float = Field(default=20.0, gt=0)
    """Seconds to wait for a pong before the connection is dropped."""
    max_events: int = Field(default=32, ge=1, le=10_000)
    """Event types one connection may subscribe to."""
    api_keys: SecretStr | None = None
    """Comma-separated keys for the HTTP publish API (``Authorization: Bearer <key>``); the API
    answers 401/403 to everyone when unset."""
    max_rooms: int = Field(default=32, ge=1, le=10_000)
    """Rooms one connection may be in at once."""
    max_frame_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    """Largest client frame; a bigger one closes the connection with 1009."""
    text_max: int = Field(default=4000, ge=1, le=4000)
    """Longest chat text, in characters (``text_too_long`` beyond)."""
    send_queue: int = Field(default=1024, ge=8, le=1_000_000)
    """Frames buffered per client; when full, new frames are dropped for that client only."""
    send_buffer_bytes: int = Field(default=1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)
    """Bytes buffered per client (WebSocket or SSE) beyond the socket's own 64 KiB; a frame that
    does not fit is dropped for that client (one frame is always let in, so a page bigger than
    this still goes to a client that reads)."""
    slow_client_timeout: float = Field(default=5.0, gt=0, le=600)
    """Seconds a client's buffer may stay full (or, SSE, one write may stay blocked) before it
    is disconnected (close 4008) and its socket aborted."""
    history_rate: float = Field(default=5.0, gt=0)
    """History queries per second one user may make through this gateway (``history``,
    ``dm.history``, ``join`` with ``since``); beyond, ``rate_limited``."""
    history_burst: int = Field(default=20, ge=1)
    """History queries one user may make in a burst above ``history_rate``."""
    request_timeout: float = Field(default=2.0, gt=0, le=60)
    """Seconds to wait for the history/presence services to answer a query."""
    ack_timeout: float = Field(default=1.0, gt=0, le=60)
    """Seconds to wait for the first storage ack before retrying (doubles per retry, max 5 s)."""
    ack_deadline: float = Field(default=30.0, gt=0, le=3600)
    """Seconds after which an unacked message is reported ``not_stored`` to its sender."""
    max_inflight: int = Field(default=128, ge=1, le=10_000)
    """Unacked messages per connection; beyond it a send waits for a slot (at most a second),
    or, while storage is down, is refused at once (``unavailable``, naming its ``client_id``):
    the gateway never stops reading a socket for long."""
    replay_buffer: int = Field(default=10_000, ge=100)
    """Live messages held per joining client (and per healing room) while stored ones are read;
    past it they are read from the stream again instead (never dropped)."""
    replay_max: int = Field(default=5_000, ge=0, le=1_000_000)
    """Most messages a ``join`` with ``since`` replays; more missed is answered
    ``recovered: false`` (reason ``too_many``, with the count)."""
    presence_ttl: float = Field(default=15.0, ge=1, le=3600)
    """Seconds a gateway's presence keys live without a refresh: a dead gateway's users leave
    their rooms within about this time (refreshed every third of it)."""
    presence_replicas: int | None = Field(default=None, ge=1, le=5)
    """JetStream replicas of the presence bucket (as the presence service's; unset: min(3,
    the cluster's size as the server reports it), never lowering an existing bucket's)."""
    typing_interval: float = Field(default=1.0, ge=0.1, le=60)
    """Seconds between two ``typing`` signals a connection may send for one room."""
    subscribe: Literal["wildcard", "rooms", "auto"] = "wildcard"
    """How the gateway subscribes to stored room messages and room presence. ``wildcard``: two
    wildcards, every room's traffic reaches every gateway. ``rooms``: one subscription per room
    with local members (made at its first local join, dropped ``SUBSCRIBE_LINGER`` s after its
    last local leave), so a gateway receives only its rooms' traffic. ``auto``: ``rooms`` while
    this gateway has at most ``SUBSCRIBE_AUTO_ROOMS`` rooms with local members, ``wildcard`` above
    that, ``rooms`` again once at or below 80% of it. DMs and events always use wildcards."""
    subscribe_linger: float = Field(default=5.0, ge=0, le=3600)
    """Seconds a room's own subscriptions outlive its last local member (``SUBSCRIBE=rooms`` or
    ``auto``): a rejoin within them subscribes nothing again."""
    subscribe_auto_rooms: int = Field(default=1000, ge=1, le=1_000_000)
    """``SUBSCRIBE=auto``: the most rooms with local members served by per-room subscriptions;
    above it the gateway switches to the wildcards (back at or below 80% of it)."""

    @model_validator(mode="after")
    def _auth_keys(self) -> GatewaySettings:
        if self.roombus_auth == "jwt" and not (self.jwt_secret or self.jwt_public_key):
            raise ValueError("ROOMBUS_AUTH=jwt needs JWT_SECRET (HS256) or JWT_PUBLIC_KEY (RS256)")
        if self.jwt_public_key and not extras.available("cryptography"):
            # PyJWT would only fail at the first token ("Algorithm not supported"): say it now.
            raise ValueError(extras.message("cryptography", "JWT_PUBLIC_KEY (RS256 tokens)"))
        return self
