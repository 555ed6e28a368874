"""Identifier rules shared by every entry point.

Room names, user ids and event-type tokens become NATS subject tokens, so they are
restricted to 1-64 ASCII letters, digits, ``-`` and ``_``. Anything else (``.``, ``*``,
``>``, whitespace, control or look-alike Unicode characters) is refused here, once,
for the WebSocket, the bus and the Redis bridge alike.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

NAME_MAX = 64
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Event types are dotted paths of name tokens (``order.created``), at most 8 tokens.
EVENT_TOKENS_MAX = 8


class InvalidNameError(ValueError):
    """A name that cannot be a subject token."""

    def __init__(self, kind: str, value: object) -> None:
        self.kind = kind
        self.value = value
        super().__init__(
            f"invalid {kind} {value!r}: use 1-{NAME_MAX} ASCII letters, digits, '-' or '_'"
        )


def is_name(value: object) -> bool:
    """True when ``value`` is a valid subject token (room, user id, event token)."""
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


def check_name(value: str, kind: str = "name") -> str:
    """Return ``value`` unchanged, or raise :class:`InvalidNameError`."""
    if not is_name(value):
        raise InvalidNameError(kind, value)
    return value


def check_event_type(value: str) -> str:
    """Validate a dotted event type such as ``order.created``."""
    tokens = value.split(".") if isinstance(value, str) else []
    if not tokens or len(tokens) > EVENT_TOKENS_MAX or not all(is_name(t) for t in tokens):
        raise InvalidNameError("event type", value)
    return value


def sanitize_user(value: str) -> str | None:
    """Turn a self-chosen display name into a valid user id, or None when nothing is left.

    Used only with auth off: characters outside the token alphabet are replaced by
    ``_`` and the result is cut to :data:`NAME_MAX`.
    """
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", value.strip())[:NAME_MAX]
    return cleaned if cleaned.strip("_") else None


def _room(v: str) -> str:
    return check_name(v, "room")


def _user(v: str) -> str:
    return check_name(v, "user")


RoomName = Annotated[str, AfterValidator(_room)]
UserId = Annotated[str, AfterValidator(_user)]
EventType = Annotated[str, AfterValidator(check_event_type)]
