"""Every NATS subject, queue group, stream and bucket name, built in one place."""

from __future__ import annotations

from .names import check_event_type, check_name

ROOM_MESSAGE_WILDCARD = "room.*.message"
ROOM_PRESENCE_WILDCARD = "room.*.presence"
USER_MESSAGE_WILDCARD = "user.*.message"
EVENT_WILDCARD = "event.>"
INBOX_WILDCARD = "inbox.>"
SVC_INBOX_WILDCARD = "svc.inbox.*"
HISTORY_WILDCARD = "history.>"
SVC_HISTORY_WILDCARD = "svc.history.*"
SVC_PRESENCE_WILDCARD = "svc.presence.*"
PRESENCE_REPORT_WILDCARD = "svc.presence-report.*"
STORED_PREFIX = "stored"
STORED_ROOM_WILDCARD = "stored.history.*"
"""Every stored room message, republished by the HISTORY stream after it is stored."""
STORED_INBOX_WILDCARD = "stored.inbox.*"
"""Every stored direct-message copy, republished by the HISTORY stream."""
REPUBLISH_SOURCE = ">"
REPUBLISH_DEST = "stored.>"
SHARDED_REPUBLISH_SOURCE = "*.*.*"
"""What a shard stream (``HISTORY_<p>``) republishes: its ``history.<p>.<room>`` and
``inbox.<p>.<user>`` subjects (a stream has one RePublish rule, so both kinds have three
tokens)..."""
SHARDED_REPUBLISH_DEST = "stored.{{wildcard(1)}}.{{wildcard(3)}}"
"""... on the subjects a single stream uses (``stored.history.<room>``, ``stored.inbox.<user>``):
the shard token is dropped, so subscribers see the same subjects whatever the shard count."""
DIRECT_GET_PREFIX = "$JS.API.DIRECT.GET."

HISTORY_QUEUE = "history"
PRESENCE_QUEUE = "presence"
BRIDGE_QUEUE = "bridge"

HISTORY_STREAM = "HISTORY"
"""The one history stream (``HISTORY_SHARDS=1``); with more shards, ``HISTORY_<p>``."""
PRESENCE_BUCKET = "presence"
PRESENCE_ANNOUNCED_BUCKET = "presence_announced"


def room_message(room: str) -> str:
    """``room.<room>.message``: chat messages of one room."""
    return f"room.{check_name(room, 'room')}.message"


def room_presence(room: str) -> str:
    """``room.<room>.presence``: join/leave/typing events of one room."""
    return f"room.{check_name(room, 'room')}.presence"


def user_message(user: str) -> str:
    """``user.<id>.message``: everything addressed to every connection of one user."""
    return f"user.{check_name(user, 'user')}.message"


def event(event_type: str) -> str:
    """``event.<type>``: a broadcast event for subscribers of that type."""
    return f"event.{check_event_type(event_type)}"


def history(room: str) -> str:
    """``history.<room>``: the JetStream subject a room's messages are stored on."""
    return f"history.{check_name(room, 'room')}"


def history_stream(shard: int | None = None) -> str:
    """``HISTORY`` (no shard: the single stream), or ``HISTORY_<p>``: shard ``p``'s stream."""
    return HISTORY_STREAM if shard is None else f"{HISTORY_STREAM}_{_shard(shard)}"


def parse_history_stream(name: str) -> int | None:
    """The shard of a ``HISTORY_<p>`` stream name, or None (``HISTORY`` or anything else)."""
    prefix = HISTORY_STREAM + "_"
    digits = name[len(prefix) :] if name.startswith(prefix) else ""
    if not digits.isdigit() or (len(digits) > 1 and digits[0] == "0"):
        return None
    return int(digits)


def sharded_history(shard: int, room: str) -> str:
    """``history.<p>.<room>``: where a room is stored in its shard's stream ``HISTORY_<p>``."""
    return f"history.{_shard(shard)}.{check_name(room, 'room')}"


def sharded_inbox(shard: int, user: str) -> str:
    """``inbox.<p>.<user>``: where a user's direct messages are stored in ``HISTORY_<p>``."""
    return f"inbox.{_shard(shard)}.{check_name(user, 'user')}"


def sharded_history_wildcard(shard: int) -> str:
    """``history.<p>.*``: the room subjects of shard ``p``'s stream."""
    return f"history.{_shard(shard)}.*"


def sharded_inbox_wildcard(shard: int) -> str:
    """``inbox.<p>.*``: the inbox subjects of shard ``p``'s stream."""
    return f"inbox.{_shard(shard)}.*"


def _shard(shard: int) -> int:
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
        raise ValueError(f"invalid shard {shard!r}: a number from 0")
    return shard


def stored_room(room: str) -> str:
    """``stored.history.<room>``: a room's messages as the stream republishes them, in order."""
    return f"{STORED_PREFIX}.{history(room)}"


def stored_inbox(user: str) -> str:
    """``stored.inbox.<user>``: a user's direct messages as the stream republishes them."""
    return f"{STORED_PREFIX}.{inbox(user)}"


def parse_stored_room(subject: str) -> str | None:
    """The room of a ``stored.history.<room>`` subject, or None."""
    return _token(subject, "stored.history.", "")


def parse_stored_inbox(subject: str) -> str | None:
    """The user of a ``stored.inbox.<user>`` subject, or None."""
    return _token(subject, "stored.inbox.", "")


def direct_get(stream: str, last_by_subject: str | None = None) -> str:
    """The JetStream direct-get API subject of ``stream`` (optionally last-by-subject)."""
    base = f"{DIRECT_GET_PREFIX}{stream}"
    return f"{base}.{last_by_subject}" if last_by_subject else base


def msg_get(stream: str) -> str:
    """The JetStream message-get API subject of ``stream`` (answered by its leader only)."""
    return f"$JS.API.STREAM.MSG.GET.{stream}"


def svc_history(room: str) -> str:
    """``svc.history.<room>``: history queries."""
    return f"svc.history.{check_name(room, 'room')}"


def svc_presence(room: str) -> str:
    """``svc.presence.<room>``: presence queries."""
    return f"svc.presence.{check_name(room, 'room')}"


def _token(subject: str, prefix: str, suffix: str) -> str | None:
    if not subject.startswith(prefix) or not subject.endswith(suffix):
        return None
    middle = subject[len(prefix) : len(subject) - len(suffix) if suffix else None]
    try:
        return check_name(middle)
    except ValueError:
        return None


def parse_room_message(subject: str) -> str | None:
    """The room of a ``room.<room>.message`` subject, or None when it is not one."""
    return _token(subject, "room.", ".message")


def parse_room_presence(subject: str) -> str | None:
    """The room of a ``room.<room>.presence`` subject, or None."""
    return _token(subject, "room.", ".presence")


def parse_user_message(subject: str) -> str | None:
    """The user of a ``user.<id>.message`` subject, or None."""
    return _token(subject, "user.", ".message")


def parse_history(subject: str) -> str | None:
    """The room of a ``history.<room>`` subject, or None."""
    return _token(subject, "history.", "")


def parse_inbox(subject: str) -> str | None:
    """The user of an ``inbox.<user>`` subject, or None."""
    return _token(subject, "inbox.", "")


def parse_svc_history(subject: str) -> str | None:
    """The room of a ``svc.history.<room>`` subject, or None."""
    return _token(subject, "svc.history.", "")


def parse_svc_presence(subject: str) -> str | None:
    """The room of a ``svc.presence.<room>`` subject, or None."""
    return _token(subject, "svc.presence.", "")


def parse_event(subject: str) -> str | None:
    """The type of an ``event.<type>`` subject, or None."""
    if not subject.startswith("event."):
        return None
    try:
        return check_event_type(subject[len("event.") :])
    except ValueError:
        return None


def presence_key(room: str, user: str, gateway: str) -> str:
    """Key of one user's membership of one room through one gateway in the presence bucket."""
    return f"{check_name(room, 'room')}.{check_name(user, 'user')}.{check_name(gateway, 'gateway')}"


def parse_presence_key(key: str) -> tuple[str, str, str] | None:
    """(room, user, gateway) of a presence key, or None when it is not one."""
    parts = key.split(".")
    if len(parts) != 3:
        return None
    try:
        return check_name(parts[0]), check_name(parts[1]), check_name(parts[2])
    except ValueError:
        return None


def presence_member_key(room: str, user: str) -> str:
    """Key of one user's announced membership of one room in the presence_announced bucket."""
    return f"{check_name(room, 'room')}.{check_name(user, 'user')}"


def parse_presence_member_key(key: str) -> tuple[str, str] | None:
    """(room, user) of a presence_announced key, or None when it is not one."""
    parts = key.split(".")
    if len(parts) != 2:
        return None
    try:
        return check_name(parts[0]), check_name(parts[1])
    except ValueError:
        return None


def kv_subject(bucket: str, key: str) -> str:
    """The JetStream subject a KV bucket stores ``key`` on (for puts with a per-key TTL)."""
    return f"$KV.{bucket}.{key}"


def inbox(user: str) -> str:
    """``inbox.<user>``: the JetStream subject of one user's direct messages (both ways)."""
    return f"inbox.{check_name(user, 'user')}"


def svc_inbox(user: str) -> str:
    """``svc.inbox.<user>``: queries of one user's stored direct messages."""
    return f"svc.inbox.{check_name(user, 'user')}"


def parse_svc_inbox(subject: str) -> str | None:
    """The user of a ``svc.inbox.<user>`` subject, or None."""
    return _token(subject, "svc.inbox.", "")
