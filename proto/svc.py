"""Request/reply payloads between gateways and the history / presence services."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .bus import ChatMessage
from .errors import ErrorCode
from .frames import Cursor
from .ids import MessageId
from .names import RoomName, UserId

REPLAY_PAGE_MAX = 1000
"""Largest page of a forward (``after``) query."""
PAGE_BYTES_MAX = 512 * 1024
"""Largest page in bytes: every reply fits the bus (nats-server's default max_payload is 1 MB);
a page cut by bytes says ``has_more``."""


class _Svc(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class HistoryQuery(_Svc):
    """``svc.history.<room>``: a page before ``before`` (newest first page), or after ``after``."""

    room: RoomName
    before: Cursor | None = None
    """Page backwards: the ``limit`` messages just older than this ``seq``."""
    after: Cursor | None = None
    """Page forwards: up to ``limit`` messages newer than this ``seq``, oldest first."""
    limit: int = Field(default=50, ge=1, le=REPLAY_PAGE_MAX)

    @model_validator(mode="after")
    def _one_direction(self) -> HistoryQuery:
        if self.before is not None and self.after is not None:
            raise ValueError("give before or after, not both")
        return self


class HistoryPage(_Svc):
    """The answer to a :class:`HistoryQuery`: messages oldest first."""

    room: RoomName
    messages: list[ChatMessage]
    has_more: bool
    """More messages exist in the asked direction (older for ``before``, newer for ``after``)."""


class StoreAck(_Svc):
    """The history replica's reply to a ``room.<room>.message`` request once JetStream stored it.

    A retried send (same ``Nats-Msg-Id`` within the idempotency window) is answered with the
    original's ``id`` and ``seq`` and ``duplicate: true``.
    """

    id: MessageId
    seq: int
    duplicate: bool = False


class PresenceQuery(_Svc):
    """``svc.presence.<room>``: who is in the room now."""

    room: RoomName


class PresenceMembers(_Svc):
    room: RoomName
    members: list[UserId]
    count: int


def service_error(code: ErrorCode, message: str) -> dict[str, Any]:
    """The body of an error reply (``{"error": {"code", "message"}}``)."""
    return {"error": {"code": code.value, "message": message}}


class InboxQuery(_Svc):
    """``svc.inbox.<user>``: that user's direct messages (sent and received), paged like rooms."""

    user: UserId
    before: Cursor | None = None
    after: Cursor | None = None
    limit: int = Field(default=50, ge=1, le=REPLAY_PAGE_MAX)

    @model_validator(mode="after")
    def _one_direction(self) -> InboxQuery:
        if self.before is not None and self.after is not None:
            raise ValueError("give before or after, not both")
        return self
