"""Message ids: ULIDs (26 Crockford base32 characters), unique and time-sortable.

An id is made once, by the first roombus service that sees a message; every later
hop (fan-out, storage, retries, replay) keeps it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator
from ulid import ULID

_ID_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


def new_id() -> str:
    """A fresh ULID string; lexicographic order is creation order (ms resolution)."""
    return str(ULID())


def is_id(value: object) -> bool:
    """True when ``value`` is a ULID string as roombus makes them."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None and value[0] <= "7"


def id_time(value: str) -> datetime:
    """The creation time encoded in an id (UTC, millisecond resolution)."""
    return ULID.from_str(value).datetime.astimezone(UTC)


def _check_id(value: str) -> str:
    if not is_id(value):
        raise ValueError(f"invalid message id {value!r}: expected a 26-character ULID")
    return value


MessageId = Annotated[str, AfterValidator(_check_id)]
