"""Client protocol frames: JSON text frames ``{"type": ..., "data": {...}}``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .bus import CLIENT_ID_MAX, TEXT_MAX
from .errors import ErrorCode
from .names import EventType, InvalidNameError, RoomName, UserId

HISTORY_LIMIT_MAX = 100
EVENTS_PER_FRAME_MAX = 32
SEQ_MAX = 2**53 - 1
"""Largest cursor accepted: stream sequences are exact JSON numbers in every client."""
EPOCH_MAX = 40

Cursor = Annotated[int, Field(ge=0, le=SEQ_MAX, strict=True)]
"""A stream sequence (``seq``) used as a cursor; 0 means "before the first message"."""


class _Data(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class JoinData(_Data):
    room: RoomName
    since: Cursor | None = None
    """``seq`` of the last message the client saw in this room: replay everything after it."""
    epoch: str | None = Field(default=None, min_length=1, max_length=EPOCH_MAX)
    """The ``epoch`` that ``since`` belongs to (from ``joined``); another epoch is not recovered."""


class RoomData(_Data):
    room: RoomName


class ChatData(_Data):
    room: RoomName | None = None
    """May be left out when the connection is in exactly one room."""
    text: str = Field(min_length=1, max_length=TEXT_MAX)
    client_id: str | None = Field(default=None, min_length=1, max_length=CLIENT_ID_MAX)
    """Makes a retried send idempotent: the same client_id maps to the same message id."""


class HistoryData(_Data):
    room: RoomName
    before: Cursor | None = None
    """Page back: the messages just older than this ``seq`` (the newest page without it)."""
    limit: int = Field(default=50, ge=1, le=HISTORY_LIMIT_MAX)


class DmData(_Data):
    to: UserId
    text: str = Field(min_length=1, max_length=TEXT_MAX)
    client_id: str | None = Field(default=None, min_length=1, max_length=CLIENT_ID_MAX)


class DmHistoryData(_Data):
    before: Cursor | None = None
    after: Cursor | None = None
    limit: int = Field(default=50, ge=1, le=HISTORY_LIMIT_MAX)


class EventsData(_Data):
    events: list[EventType] = Field(min_length=1, max_length=EVENTS_PER_FRAME_MAX)


class AuthData(_Data):
    token: str = Field(min_length=1, max_length=8192)


class _Frame(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Auth(_Frame):
    """First frame of a connection that gave no ``?token=`` (ROOMBUS_AUTH=jwt)."""

    type: Literal["auth"]
    data: AuthData


class Join(_Frame):
    type: Literal["join"]
    data: JoinData


class Leave(_Frame):
    type: Literal["leave"]
    data: RoomData


class Chat(_Frame):
    type: Literal["chat.message"]
    data: ChatData


class History(_Frame):
    type: Literal["history"]
    data: HistoryData


class Presence(_Frame):
    type: Literal["presence"]
    data: RoomData


class Typing(_Frame):
    type: Literal["typing"]
    data: RoomData


class Dm(_Frame):
    type: Literal["dm"]
    data: DmData


class DmHistory(_Frame):
    type: Literal["dm.history"]
    data: DmHistoryData


class Subscribe(_Frame):
    type: Literal["subscribe"]
    data: EventsData


class Unsubscribe(_Frame):
    type: Literal["unsubscribe"]
    data: EventsData


ClientFrame = Annotated[
    Auth
    | Join
    | Leave
    | Chat
    | History
    | Presence
    | Typing
    | Dm
    | DmHistory
    | Subscribe
    | Unsubscribe,
    Field(discriminator="type"),
]
CLIENT_FRAME_TYPES = frozenset(
    ("auth", "join", "leave", "chat.message", "history", "presence", "typing", "dm", "subscribe")
    + ("unsubscribe", "dm.history")
)
_client_frame: TypeAdapter[ClientFrame] = TypeAdapter(ClientFrame)


class FrameError(Exception):
    """A client frame that cannot be processed; carries the code the client is told."""

    def __init__(self, code: ErrorCode, message: str, frame_type: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_type = frame_type


def parse_client_frame(text: str | bytes) -> ClientFrame:
    """Parse one client frame, raising :class:`FrameError` with the code to answer."""
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise FrameError(ErrorCode.BAD_FRAME, "frame is not valid JSON") from None
    if not isinstance(raw, dict):
        raise FrameError(ErrorCode.BAD_FRAME, "frame must be a JSON object")
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in CLIENT_FRAME_TYPES:
        raise FrameError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {str(kind)[:40]!r}")
    if "data" not in raw:
        raw["data"] = {}
    try:
        return _client_frame.validate_python(raw)
    except ValidationError as exc:
        raise _frame_error(exc, kind) from None


def _frame_error(exc: ValidationError, kind: str) -> FrameError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"][1:]) or "data"
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, InvalidNameError):
        return FrameError(ErrorCode.BAD_NAME, str(cause), kind)
    if loc.endswith("text") and err["type"] == "string_too_long":
        return FrameError(ErrorCode.TEXT_TOO_LONG, f"text is longer than {TEXT_MAX}", kind)
    if loc.endswith(("since", "before", "after")):
        return FrameError(
            ErrorCode.BAD_CURSOR, f"{loc}: not a stream sequence (0 to {SEQ_MAX})", kind
        )
    return FrameError(ErrorCode.INVALID, f"{loc}: {err['msg']}", kind)


def encode_frame(kind: str, data: dict[str, Any] | BaseModel) -> bytes:
    """Encode a server frame once (UTF-8 JSON bytes), ready to write to any number of sockets."""
    payload = data.model_dump(mode="json") if isinstance(data, BaseModel) else data
    return orjson.dumps({"type": kind, "data": payload})


def error_frame(code: ErrorCode, message: str, **extra: Any) -> bytes:
    """An ``error`` frame; the connection stays open."""
    return encode_frame("error", {"code": code.value, "message": message, **extra})
