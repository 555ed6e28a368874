"""The Redis-era wire contract the bridge speaks: channel and key names, the envelope.

Redis pub/sub deployments PUBLISH to ``room:<name>`` and PSUBSCRIBE ``room:*``, forwarding
payloads verbatim to browsers. Their payloads are either plain text (a person with
``redis-cli``) or the envelope ``{"type": "chat.message", "data": {...}}``. This module
turns those into :class:`~proto.bus.ChatMessage` and back. No I/O.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .bus import TEXT_MAX, ChatMessage, utcnow
from .ids import is_id, new_id
from .names import check_name, is_name, sanitize_user

CHANNEL_PREFIX = "room:"
ALL_ROOMS_PATTERN = "room:*"
"""The PSUBSCRIBE pattern Redis-era servers use, and the bridge's default."""

VIA: Final = "roombus"
"""``data.via`` of every envelope the bridge publishes to Redis: the bridge never takes a
message carrying it back into NATS (Redis-era servers forward it unchanged)."""

ORIGIN_HEADER = "Roombus-Origin"
"""NATS header on messages the bridge brought in from Redis; they never go back to Redis."""
ORIGIN_REDIS = "redis"

KEY_PREFIX = "roombus:bridge:"
LEASE_KEY = KEY_PREFIX + "lease"
"""Redis key whose holder is the one bridge replica forwarding Redis -> NATS."""


def channel(room: str) -> str:
    """``room:<room>``: the Redis pub/sub channel of one room."""
    return CHANNEL_PREFIX + check_name(room, "room")


def parse_channel(value: str | bytes) -> str | None:
    """The room of a ``room:<room>`` channel, or None when it is not a valid one."""
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            return None
    if not value.startswith(CHANNEL_PREFIX):
        return None
    room = value[len(CHANNEL_PREFIX) :]
    return room if is_name(room) else None


def sent_key(message_id: str) -> str:
    """Redis key marking a message id as already published to Redis (cross-replica dedupe)."""
    if not is_id(message_id):
        raise ValueError(f"invalid message id {message_id!r}")
    return KEY_PREFIX + "sent:" + message_id


class DropReason(StrEnum):
    """Why a payload from Redis was not forwarded (the bridge's drop counter label)."""

    BAD_ROOM = "bad_room"
    """The channel is not ``room:<valid name>``."""
    NOT_UTF8 = "not_utf8"
    """The payload is not UTF-8 text."""
    EMPTY = "empty"
    """Plain text that is empty or only whitespace."""
    TOO_LONG = "too_long"
    """Text longer than the chat limit."""
    BAD_ENVELOPE = "bad_envelope"
    """A JSON object that is not a valid ``chat.message`` envelope."""
    ROOM_MISMATCH = "room_mismatch"
    """The envelope names another room than its channel."""
    BAD_USER = "bad_user"
    """The envelope's user has nothing usable after sanitizing."""


class RedisDropError(ValueError):
    """A Redis payload the bridge drops; ``reason`` is the stable label."""

    def __init__(self, reason: DropReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}")


class RedisChatIn(BaseModel):
    """``data`` of a Redis-era ``chat.message`` envelope, as read (lenient but bounded)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    text: str = Field(min_length=1, max_length=TEXT_MAX)
    user: str | None = Field(default=None, max_length=256)
    """Sanitized like a self-chosen name; the bridge user when missing."""
    room: str | None = Field(default=None, max_length=256)
    """Must equal the channel's room when present."""
    id: Any = None
    """Kept when it is a roombus id (ULID), replaced otherwise."""
    ts: Any = None
    """Kept when it parses as a date-time (ISO-8601 or epoch), now otherwise."""
    via: Any = None


class RedisEnvelopeIn(BaseModel):
    """The Redis-era envelope ``{"type": "chat.message", "data": {...}}``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["chat.message"]
    data: RedisChatIn


class RedisChatOut(ChatMessage):
    """``data`` of an envelope the bridge publishes: a chat message marked ``via``."""

    via: Literal["roombus"] = VIA


class RedisEnvelopeOut(BaseModel):
    """What the bridge PUBLISHes to ``room:<room>``: the client protocol's chat frame."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["chat.message"] = "chat.message"
    data: RedisChatOut


_TS = TypeAdapter(datetime)


def _ts(value: object) -> datetime:
    if value is None or isinstance(value, bool):
        return utcnow()
    try:
        ts = _TS.validate_python(value)
    except ValidationError:
        return utcnow()
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC)


def parse_redis_payload(data: bytes, room: str, default_user: str) -> ChatMessage | None:
    """The chat message a Redis payload on ``room:<room>`` stands for.

    Returns None for an envelope the bridge itself published (``data.via == "roombus"``);
    raises :class:`RedisDropError` for anything that is neither plain text nor a valid
    envelope. Messages from Redis are never ``verified``.
    """
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise RedisDropError(DropReason.NOT_UTF8, "payload is not UTF-8") from None
    if text.lstrip().startswith("{"):
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError:
            raw = None  # "{ hi" from a person is plain text
        if isinstance(raw, dict):
            return _from_envelope(raw, room, default_user)
    if not text.strip():
        raise RedisDropError(DropReason.EMPTY, "empty text")
    if len(text) > TEXT_MAX:
        raise RedisDropError(DropReason.TOO_LONG, f"text is longer than {TEXT_MAX}")
    return ChatMessage(id=new_id(), room=room, user=default_user, text=text, ts=utcnow())


def _from_envelope(raw: dict[str, Any], room: str, default_user: str) -> ChatMessage | None:
    inner = raw.get("data")
    if raw.get("type") == "chat.message" and isinstance(inner, dict) and inner.get("via") == VIA:
        return None
    try:
        env = RedisEnvelopeIn.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "payload"
        if loc == "data.text" and err["type"] == "string_too_long":
            raise RedisDropError(DropReason.TOO_LONG, f"text is longer than {TEXT_MAX}") from None
        raise RedisDropError(DropReason.BAD_ENVELOPE, f"{loc}: {err['msg']}") from None
    d = env.data
    if d.room is not None and d.room != room:
        raise RedisDropError(DropReason.ROOM_MISMATCH, f"data.room {d.room!r} is not {room!r}")
    user = default_user if d.user is None else sanitize_user(d.user)
    if user is None:
        raise RedisDropError(DropReason.BAD_USER, f"unusable user {d.user!r}")
    return ChatMessage(
        id=d.id if is_id(d.id) else new_id(),
        room=room,
        user=user,
        text=d.text,
        ts=_ts(d.ts),
    )


def envelope(msg: ChatMessage) -> bytes:
    """The Redis-era envelope of ``msg``, marked ``via: roombus`` (never ``client_id``)."""
    # ``msg`` is already a validated ChatMessage: dump it rather than validate it again
    # (this is the bridge's hot path); the result is a valid RedisEnvelopeOut.
    data = msg.model_dump(mode="json", exclude_none=True, exclude={"client_id", "seq", "prev"})
    data["via"] = VIA
    return orjson.dumps({"type": "chat.message", "data": data})
