"""What the client raises. Every class carries data, not just a message."""

from __future__ import annotations

__all__ = [
    "ClientClosed",
    "NotRecovered",
    "RequestFailed",
    "RoombusError",
    "SendRefused",
    "SendTimeout",
    "Unauthorized",
]


class RoombusError(Exception):
    """Base class of everything this client raises."""


class NotRecovered(RoombusError):
    """Raised once by ``async for msg in room`` where messages may be missing.

    The gateway could not replay what was missed while the client was away (``reason``:
    ``expired`` — retention removed them, ``epoch`` — the stream was recreated, ``too_many`` —
    more than the gateway replays, ``missed`` says how many, ``bad_cursor`` — ``since`` is not a
    position of this room). The room now stands at ``seq``; iterate again to receive what
    follows, and reload older messages with ``room.history()`` if you need them.
    """

    def __init__(self, room: str, reason: str, seq: int | None, missed: int | None) -> None:
        super().__init__(f"{room}: messages could not be recovered ({reason})")
        self.room = room
        self.reason = reason
        self.seq = seq
        self.missed = missed


class Unauthorized(RoombusError):
    """The gateway refused the token (close 4001) or it expired (4002), and no
    ``token_provider`` could give a new one: the client stopped."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed {code}: {reason or 'unauthorized'}")
        self.code = code
        self.reason = reason


class ClientClosed(RoombusError):
    """The client was closed (or stopped) while this call waited."""


class SendRefused(RoombusError):
    """The gateway refused a send for good (``code``: ``text_too_long``, ``forbidden``,
    ``not_joined``...). Transient refusals (``unavailable``, ``not_stored``, ``rate_limited``)
    are retried with the same ``client_id`` instead."""

    def __init__(self, client_id: str, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.client_id = client_id
        self.code = code
        self.message = message


class SendTimeout(RoombusError, TimeoutError):
    """No ack within the send's ``timeout``. The message may still be stored later: sending
    again with the same ``client_id`` is safe (stored once, within the idempotency window)."""

    def __init__(self, client_id: str, timeout: float) -> None:
        super().__init__(f"send {client_id} not acked within {timeout}s")
        self.client_id = client_id
        self.timeout = timeout


class RequestFailed(RoombusError):
    """A query (history, presence) answered with an ``error`` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
