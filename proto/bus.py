"""Payloads on the bus (NATS). Consumers ignore unknown fields; producers build them strictly."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .ids import MessageId, new_id
from .names import RoomName, UserId, check_name

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
    seq: int | None = Field(default=None, ge=1)
    """Stream sequence (on the way to clients; not part of the stored payload)."""
    prev: int | None = Field(default=None, ge=0)
    """The previous ``seq`` in the same room (0: none), so a receiver can check for gaps."""


class BusChatInput(_Payload):
    """What anyone may publish on ``room.<room>.message`` (``nats pub``, a backend, the bridge).

    Only ``user`` and ``text`` are required; ``room`` comes from the subject. For a stored
    room the history service makes ``id`` and ``ts`` (whatever the payload says); for an
    ephemeral room the first gateway that sees the message fills in what is missing.
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
        # Every field was validated by this model (room: below): no second validation.
        return ChatMessage.model_construct(
            id=self.id or new_id(),
            room=check_name(room),
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


def stamp_bus_chat(data: bytes, room: str) -> ChatMessage:
    """A ``room.<room>.message`` payload as it is stored: ``id`` and ``ts`` made here, now.

    Nothing from outside chooses a stored id or timestamp (a far-future id or a 1970 ``ts``
    would otherwise be kept). Raises ValueError for anything malformed.
    """
    try:
        raw = BusChatInput.model_validate_json(data)
    except ValidationError as exc:
        raise ValueError(_first_error(exc)) from None
    if raw.room is not None and raw.room != room:
        raise ValueError(f"payload room {raw.room!r} does not match subject room {room!r}")
    return ChatMessage.model_construct(
        id=new_id(),
        room=check_name(room),
        user=raw.user,
        text=raw.text,
        ts=utcnow(),
        client_id=raw.client_id,
        verified=raw.verified,
        seq=None,
        prev=None,
    )


def stored_chat(data: bytes) -> ChatMessage:
    """A payload read back from the stream (``history.<room>``); raises ValueError."""
    try:
        return ChatMessage.model_validate_json(data)
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


class DirectMessage(_Payload):
    """A message to one user, on ``user.<to>.message``: DMs and backend notifications."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    id: MessageId
    sender: UserId = Field(alias="from")
    """Who sent it (``system`` for backend notifications without a sender)."""
    to: UserId
    text: str = Field(min_length=1, max_length=TEXT_MAX)
    ts: datetime
    client_id: str | None = Field(default=None, max_length=CLIENT_ID_MAX)
    verified: bool = False
    seq: int | None = Field(default=None, ge=1)
    """Stream sequence of this copy (in the receiving user's inbox)."""
    prev: int | None = Field(default=None, ge=0)
    """The previous ``seq`` in the same inbox (0: none)."""

    def wire(self) -> dict[str, object]:
        """The JSON form (``from``, not ``sender``)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class BusDirectInput(_Payload):
    """What anyone may publish on ``user.<to>.message``; ``from`` defaults to ``system``."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    id: MessageId | None = None
    sender: UserId = Field(default="system", alias="from")
    to: UserId | None = None
    text: str = Field(min_length=1, max_length=TEXT_MAX)
    ts: datetime | None = None
    client_id: str | None = Field(default=None, max_length=CLIENT_ID_MAX)
    verified: bool = False


def stored_direct(data: bytes) -> DirectMessage:
    """A direct message read back from the stream (``inbox.<user>``); raises ValueError."""
    try:
        return DirectMessage.model_validate_json(data)
    except ValidationError as exc:
        raise ValueError(_first_error(exc)) from None


def parse_bus_direct(data: bytes, to: str) -> DirectMessage:
    """Parse a ``user.<to>.message`` payload, stamping ``id`` and ``ts`` here (never taken from
    outside); raises ValueError for anything malformed."""
    try:
        raw = BusDirectInput.model_validate_json(data)
    except ValidationError as exc:
        raise ValueError(_first_error(exc)) from None
    if raw.to is not None and raw.to != to:
        raise ValueError(f"payload to {raw.to!r} does not match subject user {to!r}")
    return DirectMessage(
        id=new_id(),
        sender=raw.sender,
        to=to,
        text=raw.text,
        ts=utcnow(),
        client_id=raw.client_id,
        verified=raw.verified,
    )
