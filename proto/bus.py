"""Payloads on the bus (NATS). Consumers ignore unknown fields; producers build them strictly."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .ids import MessageId, new_id
from .names import RoomName, UserId

TEXT_MAX = 4000
CLIENT_ID_MAX = 64


def utcnow() -> datetime:
    """Now, in UTC (the only clock roombus stamps messages with)."""
    return datetime.now(UTC)


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ChatMessage(_Payload):
    """A chat message as it travels on ``room.<room>.message`` and is stored in ``HISTORY``."""

    id: MessageId
    """Unique, time-sortable id (ULID), made by the first service that saw the message."""
    room: RoomName
    user: UserId
    text: str = Field(min_length=1, max_length=TEXT_MAX)
    ts: datetime
    """When the message entered roombus (UTC, ISO-8601)."""
    client_id: str | None = Field(default=None, max_length=CLIENT_ID_MAX)
    """The sender's idempotency key, echoed so the sender can match its ``ack``."""
    verified: bool = False
    """True when ``user`` comes from a verified token, false for self-chosen names."""


class BusChatInput(_Payload):
    """What anyone may publish on ``room.<room>.message`` (``nats pub``, a backend, the bridge).

    Only ``user`` and ``text`` are required; ``id`` and ``ts`` are filled in by the first
    roombus service that sees the message, and ``room`` comes from the subject.
    """

    id: MessageId | None = None
    room: RoomName | None = None
    user: UserId
    text: str = Field(min_length=1, max_length=TEXT_MAX)
    ts: datetime | None = None
    client_id: str | None = Field(default=None, max_length=CLIENT_ID_MAX)
    verified: bool = False

    def complete(self, room: str) -> ChatMessage:
        """The full message for ``room`` (the subject's room); raises ValueError on mismatch."""
        if self.room is not None and self.room != room:
            raise ValueError(f"payload room {self.room!r} does not match subject room {room!r}")
        ts = self.ts if self.ts is not None else utcnow()
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        return ChatMessage(
            id=self.id or new_id(),
            room=room,
            user=self.user,
            text=self.text,
            ts=ts.astimezone(UTC),
            client_id=self.client_id,
            verified=self.verified,
        )


def parse_bus_chat(data: bytes, room: str) -> ChatMessage:
    """Parse a ``room.<room>.message`` payload; raises ValueError for anything malformed."""
    try:
        return BusChatInput.model_validate_json(data).complete(room)
    except ValidationError as exc:
        raise ValueError(_first_error(exc)) from None


class PresenceEvent(_Payload):
    """An event on ``room.<room>.presence``."""

    type: Literal["join", "leave", "typing"]
    room: RoomName
    user: UserId
    count: int | None = Field(default=None, ge=0)
    """Members in the room after the event (join/leave only)."""
    ts: datetime


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "payload"
    return f"{loc}: {err['msg']}"
