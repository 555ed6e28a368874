"""What was announced: per (room, user), present or not as of which presence revision.

The ``presence_announced`` bucket is the presence service's memory across restarts and the
arbiter between replicas. A transition of the presence bucket at revision R is announced by
whichever replica moves the (room, user) mark to the new state at R with a compare-and-set
on the mark's own revision; a replica that finds the mark already at R or later (another
replica got there first, or a newer revision was recorded) stays silent. So each join and
leave goes out once, and a replica that was down diffs the live state against the marks
and announces exactly what changed meanwhile.

"Present" marks have no expiry (the member may stay for days); "absent" marks expire after
``absent_ttl``: they only keep a lagging replica from announcing a stale transition, and
an absent mark and no mark mean the same.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import orjson
from nats.js import JetStreamContext
from nats.js.api import Header, KeyValueConfig, StorageType
from nats.js.errors import APIError, KeyNotFoundError
from nats.js.kv import KeyValue

from proto import subjects
from services.jetstream import REPLICAS_DEFAULT

log = logging.getLogger("roombus.presence.ledger")

# JetStream's "wrong last sequence" error codes: another writer moved the mark first.
WRONG_LAST_SEQUENCE = (10071, 10164)
CAS_ATTEMPTS = 20


def ledger_config(replicas: int | None, max_bytes: int) -> KeyValueConfig:
    return KeyValueConfig(
        bucket=subjects.PRESENCE_ANNOUNCED_BUCKET,
        description="roombus presence: the membership last announced per room.user",
        history=1,
        storage=StorageType.FILE,
        replicas=replicas or REPLICAS_DEFAULT,
        max_bytes=max_bytes,
    )


@dataclass(frozen=True)
class Mark:
    present: bool
    rev: int
    """The presence-bucket revision this mark reflects (0: never announced)."""
    kv_rev: int = 0
    """The mark's own revision in the ledger bucket (0: no entry), for compare-and-set."""


ABSENT = Mark(present=False, rev=0)


def _decode(value: bytes | None, kv_rev: int) -> Mark:
    try:
        data = orjson.loads(value or b"")
        return Mark(present=bool(data["in"]), rev=int(data["rev"]), kv_rev=kv_rev)
    except (ValueError, KeyError, TypeError):
        return Mark(present=False, rev=0, kv_rev=kv_rev)


class Ledger:
    def __init__(self, js: JetStreamContext, kv: KeyValue, absent_ttl: float) -> None:
        self.js = js
        self.kv = kv
        self.absent_ttl = absent_ttl

    async def present(self) -> dict[tuple[str, str], Mark]:
        """Every (room, user) last announced as present."""
        out: dict[tuple[str, str], Mark] = {}
        watcher = await self.kv.watchall(ignore_deletes=True)
        try:
            async for entry in watcher:
                if entry is None:
                    break
                parsed = subjects.parse_presence_member_key(entry.key)
                mark = _decode(entry.value, entry.revision or 0)
                if parsed is not None and mark.present:
                    out[parsed] = mark
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
        return out

    async def _get(self, key: str) -> Mark:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError as exc:  # never written, expired, or a delete marker
            deleted = getattr(exc, "entry", None)
            return Mark(False, 0, deleted.revision or 0) if deleted is not None else ABSENT
        return _decode(entry.value, entry.revision or 0)

    async def claim(self, room: str, user: str, present: bool, rev: int) -> bool:
        """Move (room, user) to ``present`` as of presence revision ``rev``.

        True when this call changed the announced state: the caller announces it. False
        when it already was so, or a mark at ``rev`` or newer exists (this transition is
        announced, or superseded, elsewhere).
        """
        key = subjects.presence_member_key(room, user)
        subject = subjects.kv_subject(subjects.PRESENCE_ANNOUNCED_BUCKET, key)
        value = orjson.dumps({"in": present, "rev": rev})
        for _ in range(CAS_ATTEMPTS):
            mark = await self._get(key)
            if mark.rev >= rev or mark.present == present:
                return False
            try:
                await self.js.publish(
                    subject,
                    value,
                    headers={Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(mark.kv_rev)},
                    msg_ttl=None if present else self.absent_ttl,
                )
            except APIError as exc:
                if exc.err_code in WRONG_LAST_SEQUENCE:
                    continue  # another replica moved it: look again
                raise
            return True
        log.warning("presence mark kept changing; not announced", extra={"key": key})
        return False
