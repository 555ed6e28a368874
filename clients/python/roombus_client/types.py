"""The frames a roombus gateway sends, as small typed dataclasses.

Their fields mirror the server's JSON Schemas (``proto/schemas/*.json``; a test of the roombus
repository checks they agree). Parsing ignores unknown fields, so a newer gateway that adds one
does not break an older client.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

__all__ = [
    "Ack",
    "ChatMessage",
    "DirectMessage",
    "Event",
    "Joined",
    "Presence",
    "PresenceChange",
    "Typing",
    "OUTGOING",
]

OUTGOING: dict[str, tuple[str, ...]] = {
    "auth": ("token",),
    "join": ("room", "since", "epoch"),
    "leave": ("room",),
    "chat.message": ("room", "text", "client_id"),
    "history": ("room", "before", "limit"),
    "presence": ("room",),
    "typing": ("room",),
    "dm": ("to", "text", "client_id"),
    "dm.history": ("before", "after", "limit"),
    "subscribe": ("events",),
    "unsubscribe": ("events",),
}
"""The ``data`` fields of every frame this client sends, by frame type."""


def _ts(value: object) -> datetime:
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """A stored room message (``chat.message``). ``seq`` is its stream position (strictly
    increasing within a room, not contiguous); ``prev`` the room's previous ``seq`` (0: none).
    Both are ``None`` only in ephemeral rooms, which are never stored."""

    id: str
    room: str
    user: str
    text: str
    ts: datetime
    client_id: str | None = None
    verified: bool = False
    seq: int | None = None
    prev: int | None = None

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ChatMessage:
        return cls(
            id=str(d["id"]),
            room=str(d["room"]),
            user=str(d["user"]),
            text=str(d["text"]),
            ts=_ts(d["ts"]),
            client_id=_opt_str(d.get("client_id")),
            verified=bool(d.get("verified", False)),
            seq=_opt_int(d.get("seq")),
            prev=_opt_int(d.get("prev")),
        )


@dataclass(frozen=True, slots=True)
class DirectMessage:
    """A direct message (``dm``), with the ``seq``/``prev`` of the receiving user's inbox.
    ``sender`` is the wire's ``from`` (a Python keyword)."""

    id: str
    sender: str = field(metadata={"wire": "from"})
    to: str = ""
    text: str = ""
    ts: datetime = field(default_factory=lambda: datetime.fromtimestamp(0))
    client_id: str | None = None
    verified: bool = False
    seq: int | None = None
    prev: int | None = None

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> DirectMessage:
        return cls(
            id=str(d["id"]),
            sender=str(d["from"]),
            to=str(d["to"]),
            text=str(d["text"]),
            ts=_ts(d["ts"]),
            client_id=_opt_str(d.get("client_id")),
            verified=bool(d.get("verified", False)),
            seq=_opt_int(d.get("seq")),
            prev=_opt_int(d.get("prev")),
        )


def wire_names(cls: type[ChatMessage] | type[DirectMessage]) -> dict[str, str]:
    """Wire name -> attribute name of a message dataclass."""
    return {f.metadata.get("wire", f.name): f.name for f in fields(cls)}


@dataclass(frozen=True, slots=True)
class Ack:
    """A send confirmed stored: its message ``id`` and stream ``seq`` (``None`` when the room
    is ephemeral)."""

    client_id: str
    id: str
    seq: int | None


@dataclass(frozen=True, slots=True)
class Joined:
    """Where a (re)join left the client: ``seq`` is its position in the room."""

    room: str
    user: str
    epoch: str | None
    seq: int | None
    recovered: bool | None = None
    reason: str | None = None
    missed: int | None = None
    ephemeral: bool = False
    members: tuple[str, ...] | None = None

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Joined:
        members = d.get("members")
        rec = d.get("recovered")
        return cls(
            room=str(d["room"]),
            user=str(d.get("user", "")),
            epoch=_opt_str(d.get("epoch")),
            seq=_opt_int(d.get("seq")),
            recovered=rec if isinstance(rec, bool) else None,
            reason=_opt_str(d.get("reason")),
            missed=_opt_int(d.get("missed")),
            ephemeral=bool(d.get("ephemeral", False)),
            members=tuple(str(m) for m in members) if isinstance(members, list) else None,
        )


@dataclass(frozen=True, slots=True)
class Presence:
    """Who is in a room now (the answer to ``presence()``)."""

    room: str
    members: tuple[str, ...]
    count: int


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """Someone arrived (``event == "join"``) or left (``"leave"``); ``count`` is the new size."""

    room: str
    event: str
    user: str
    count: int | None


@dataclass(frozen=True, slots=True)
class Typing:
    """``user`` is typing in ``room`` (never stored; sent at most once a second or so)."""

    room: str
    user: str


@dataclass(frozen=True, slots=True)
class Event:
    """A backend event (``event.<type>`` on the bus) for a subscribed type; live only."""

    event: str
    payload: Any
