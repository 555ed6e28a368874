"""The local room -> connections map and the fan-out from the bus to local clients."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

import orjson
from nats.aio.msg import Msg

from proto import subjects
from proto.bus import ChatMessage, PresenceEvent, parse_bus_chat, parse_bus_direct
from proto.errors import CloseCode
from proto.frames import encode_frame
from services.logs import RateLimitedLog

from . import metrics
from .conn import Conn
from .presence import PresenceReporter
from .wire import text_frame

log = logging.getLogger("roombus.gateway.hub")


class RecentIds:
    """A bounded set of recently seen message ids (oldest forgotten first)."""

    def __init__(self, size: int) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def seen(self, msg_id: str) -> bool:
        """True if ``msg_id`` was seen before; records it otherwise."""
        if msg_id in self._ids:
            return True
        self._ids[msg_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return False


class Hub:
    """Which local connections are in which room, and delivery to them.

    The gateway holds one wildcard subscription per channel kind; every bus
    message is parsed and encoded once, then offered to each local member.
    """

    def __init__(self, dedupe_window: int, replay_buffer: int = 10_000) -> None:
        self.replay_buffer = replay_buffer
        # Local connections per (room, user): presence is per user, not per tab.
        self.user_counts: dict[tuple[str, str], int] = {}
        self.presence: PresenceReporter | None = None
        self.rooms: dict[str, set[Conn]] = {}
        self.conns: set[Conn] = set()
        self.users: dict[str, set[Conn]] = {}
        self.events: dict[str, set[Conn]] = {}
        self._recent = RecentIds(dedupe_window)
        self._badlog = RateLimitedLog(log)

    # -- membership -------------------------------------------------------------------
    def add(self, conn: Conn) -> None:
        self.conns.add(conn)
        if conn.dms:
            self.users.setdefault(conn.user, set()).add(conn)
        metrics.CONNECTIONS.set(len(self.conns))

    def remove(self, conn: Conn) -> list[str]:
        """Forget ``conn`` everywhere; returns the rooms it was in."""
        rooms = list(conn.rooms)
        for room in rooms:
            self.leave(conn, room)
        for event in list(conn.events):
            self.unsubscribe(conn, event)
        mine = self.users.get(conn.user)
        if mine is not None:
            mine.discard(conn)
            if not mine:
                del self.users[conn.user]
        self.conns.discard(conn)
        metrics.CONNECTIONS.set(len(self.conns))
        return rooms

    def join(self, conn: Conn, room: str) -> bool:
        """Add ``conn`` to ``room``; False when it already was a member."""
        if room in conn.rooms:
            return False
        conn.rooms.add(room)
        self.rooms.setdefault(room, set()).add(conn)
        metrics.ROOMS.set(len(self.rooms))
        key = (room, conn.user)
        self.user_counts[key] = self.user_counts.get(key, 0) + 1
        if self.user_counts[key] == 1 and self.presence is not None:
            self.presence.join(room, conn.user)
        return True

    def leave(self, conn: Conn, room: str) -> bool:
        if room not in conn.rooms:
            return False
        conn.rooms.discard(room)
        members = self.rooms.get(room)
        if members is not None:
            members.discard(conn)
            if not members:
                del self.rooms[room]
        metrics.ROOMS.set(len(self.rooms))
        key = (room, conn.user)
        left = self.user_counts.get(key, 1) - 1
        if left > 0:
            self.user_counts[key] = left
        else:
            self.user_counts.pop(key, None)
            if self.presence is not None:
                self.presence.leave(room, conn.user)
        return True

    def subscribe(self, conn: Conn, event: str) -> None:
        conn.events.add(event)
        self.events.setdefault(event, set()).add(conn)

    def unsubscribe(self, conn: Conn, event: str) -> None:
        conn.events.discard(event)
        members = self.events.get(event)
        if members is not None:
            members.discard(conn)
            if not members:
                del self.events[event]

    def local_users(self, room: str) -> set[str]:
        return {c.user for c in self.rooms.get(room, ())}

    async def sweep_idle(self, idle_timeout: float) -> None:
        """Close (4009) every connection that sent nothing for ``idle_timeout`` s.

        One sweep for all connections instead of a timer per read on each of them.
        """
        every = max(0.05, min(1.0, idle_timeout / 4))
        while True:
            await asyncio.sleep(every)
            cutoff = time.monotonic() - idle_timeout
            for conn in [c for c in self.conns if c.last_seen is not None and c.last_seen < cutoff]:
                conn.shut(CloseCode.IDLE_TIMEOUT)

    # -- fan-out ----------------------------------------------------------------------
    def deliver(self, room: str, frame: bytes, msg_id: str | None = None) -> int:
        """Offer one encoded frame to every local member of ``room``; returns how many took it.

        The WebSocket frame is built here, once, and written as is to every member's socket.
        """
        members = self.rooms.get(room)
        if not members:
            return 0
        wire = text_frame(frame)
        n = 0
        for conn in tuple(members):
            if conn.replaying:
                held = conn.replaying.get(room)
                if held is not None and msg_id is not None:
                    if len(held) < self.replay_buffer:
                        held.append((msg_id, frame))
                    else:
                        metrics.DROPPED.labels("replay_buffer").inc()
                    continue
            n += conn.offer(frame, msg_id, wire)
        metrics.DELIVERED.inc(n)
        return n

    def remember(self, msg_id: str) -> None:
        """Mark ``msg_id`` as delivered (e.g. replayed) so a late live copy is dropped."""
        self._recent.seen(msg_id)

    def deliver_message(self, msg: ChatMessage) -> int:
        """Fan out a chat message once per id (a retried publish is suppressed)."""
        if self._recent.seen(msg.id):
            metrics.DUPLICATES.inc()
            return 0
        return self.deliver(msg.room, encode_frame("chat.message", msg), msg.id)

    async def on_user_message(self, msg: Msg) -> None:
        """Callback of ``user.*.message``: to every local connection of the sender and recipient."""
        metrics.BUS_IN.labels("user_message").inc()
        to = subjects.parse_user_message(msg.subject)
        if to is None:
            metrics.BUS_MALFORMED.labels("user_message").inc()
            return
        try:
            dm = parse_bus_direct(msg.data, to)
        except ValueError as exc:
            metrics.BUS_MALFORMED.labels("user_message").inc()
            self._badlog.warning(
                "bad_direct",
                "dropped malformed direct message",
                subject=msg.subject,
                error=str(exc),
            )
            return
        targets = self.users.get(dm.to, set()) | self.users.get(dm.sender, set())
        if not targets or self._recent.seen(dm.id):
            return
        frame = encode_frame("dm", dm.wire())
        wire = text_frame(frame)
        n = sum(conn.offer(frame, dm.id, wire) for conn in targets)
        metrics.DELIVERED.inc(n)

    async def on_event(self, msg: Msg) -> None:
        """Callback of ``event.>``: to the local connections subscribed to that event type."""
        metrics.BUS_IN.labels("event").inc()
        kind = subjects.parse_event(msg.subject)
        if kind is None:
            metrics.BUS_MALFORMED.labels("event").inc()
            self._badlog.warning("bad_event", "dropped event", subject=msg.subject[:200])
            return
        members = self.events.get(kind)
        if not members:
            return
        try:
            orjson.loads(msg.data)  # any JSON value; checked once, spliced in as is
        except orjson.JSONDecodeError:
            metrics.BUS_MALFORMED.labels("event").inc()
            self._badlog.warning("bad_event", "dropped event: payload is not JSON", event=kind)
            return
        frame = (
            b'{"type":"event","data":{"event":"'
            + kind.encode()
            + b'","payload":'
            + msg.data
            + b"}}"
        )
        wire = text_frame(frame)
        n = sum(conn.offer(frame, None, wire) for conn in tuple(members))
        metrics.DELIVERED.inc(n)

    async def on_room_presence(self, msg: Msg) -> None:
        """Callback of the ``room.*.presence`` wildcard: join/leave/typing to local members."""
        metrics.BUS_IN.labels("room_presence").inc()
        room = subjects.parse_room_presence(msg.subject)
        if room is None or room not in self.rooms:
            return
        try:
            event = PresenceEvent.model_validate_json(msg.data)
            if event.room != room:
                raise ValueError("event room does not match subject")
        except ValueError as exc:
            metrics.BUS_MALFORMED.labels("room_presence").inc()
            self._badlog.warning(
                "bad_presence",
                "dropped malformed presence event",
                subject=msg.subject,
                error=str(exc)[:300],
            )
            return
        if event.type == "typing":
            frame = encode_frame("typing", {"room": room, "user": event.user})
        else:
            data = {"room": room, "event": event.type, "user": event.user, "count": event.count}
            frame = encode_frame("presence", data)
        self.deliver(room, frame)

    async def on_room_message(self, msg: Msg) -> None:
        """Callback of the ``room.*.message`` wildcard subscription."""
        metrics.BUS_IN_ROOM_MESSAGE.inc()
        room = subjects.parse_room_message(msg.subject)
        if room is None:
            metrics.BUS_MALFORMED.labels("room_message").inc()
            self._badlog.warning("bad_subject", "dropped bus message", subject=msg.subject[:200])
            return
        if room not in self.rooms:
            return  # nobody here is interested: no parse, no encode
        start = time.perf_counter()
        try:
            chat = parse_bus_chat(msg.data, room)
        except ValueError as exc:
            metrics.BUS_MALFORMED.labels("room_message").inc()
            self._badlog.warning(
                "bad_payload", "dropped malformed bus message", subject=msg.subject, error=str(exc)
            )
            return
        self.deliver_message(chat)
        metrics.FANOUT_SECONDS.observe(time.perf_counter() - start)
