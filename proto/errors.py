"""Stable error codes and WebSocket close codes. Clients may switch on these values."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` frame. The connection stays open after any of these."""

    BAD_FRAME = "bad_frame"
    """The frame is not JSON, not an object, or not UTF-8 text."""
    UNKNOWN_TYPE = "unknown_type"
    """``type`` names no client frame."""
    INVALID = "invalid"
    """A field is missing, of the wrong type, or out of range (see ``message``)."""
    BAD_NAME = "bad_name"
    """A room, user or event name breaks the naming rule."""
    NOT_JOINED = "not_joined"
    """Sending to, or asking about, a room this connection has not joined."""
    ROOM_REQUIRED = "room_required"
    """``chat.message`` without ``room`` while in zero or several rooms."""
    TOO_MANY_ROOMS = "too_many_rooms"
    """The per-connection room limit is reached."""
    TEXT_TOO_LONG = "text_too_long"
    """``text`` is longer than the configured limit."""
    RATE_LIMITED = "rate_limited"
    """Too many frames per second; the frame was not processed."""
    FORBIDDEN = "forbidden"
    """The authenticated user may not use that room or channel."""
    UNAVAILABLE = "unavailable"
    """A backing service (history, presence, the bus) did not answer in time."""
    NOT_STORED = "not_stored"
    """A message could not be confirmed stored after every retry (it may still arrive)."""
    BAD_CURSOR = "bad_cursor"
    """``since`` / ``before`` / ``after`` is not a stream sequence of that room or inbox."""
    INTERNAL = "internal"
    """An unexpected server fault; the frame was not processed."""


class CloseCode(IntEnum):
    """WebSocket close codes roombus uses (4000-4999 are application reasons)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    """The server is shutting down: reconnect, possibly to another gateway."""
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4001
    """Missing, malformed, forged or wrong-key token."""
    TOKEN_EXPIRED = 4002
    """The token's ``exp`` passed; reconnect with a fresh token."""
    SLOW_CONSUMER = 4008
    """The client did not read fast enough and its buffer stayed full."""
    IDLE_TIMEOUT = 4009
    """Nothing was heard from the client within the idle timeout."""
    TOO_MANY_CONNECTIONS = 4029
    """Connection limit (per gateway or per client address) reached."""
