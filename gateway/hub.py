"""The local room -> connections map and the fan-out from the bus to local clients."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from proto import subjects
from proto.bus import PresenceEvent, parse_bus_chat
from proto.errors import CloseCode
from proto.frames import encode_frame
from services.bus import CoreNats
from services.logs import Malformed, RateLimitedLog
from services.streamread import Reader

from . import metrics
from .conn import Conn
from .feeds import Feed, Feeds, Route, inbox_frame, room_frame
from .framing import text_frame
from .interest import PENDING_BYTES, PENDING_MSGS
from .presence import PresenceReporter

if TYPE_CHECKING:
    from .interest import Interest

log = logging.getLogger("roombus.gateway.hub")


class Hub:
    """Which local connections are in which room, and delivery to them.

    The gateway holds one wildcard subscription per channel kind — or, for stored room
    messages and room presence, one per room with local members (:class:`Interest`) — and
    one per ephemeral room with local members; every bus message is parsed and encoded once,
    then offered to each local member. Stored messages go through a :class:`Feed` per room /
    inbox.
    """

    def __init__(self, replay_buffer: int = 10_000) -> None:
        self.replay_buffer = replay_buffer
        # Local connections per (room, user): presence is per user, not per tab.
        self.user_counts: dict[tuple[str, str], int] = {}
        self.presence: PresenceReporter | None = None
        self.rooms: dict[str, set[Conn]] = {}
        self.conns: set[Conn] = set()
        self.users: dict[str, set[Conn]] = {}
        self.events: dict[str, set[Conn]] = {}
        self.feeds: Feeds | None = None
        self.interest: Interest | None = None
        """Which rooms' traffic reaches this gateway (None: every room's, as in tests)."""
        self.ephemeral: dict[str, Subscription | None] = {}
        """Ephemeral rooms with local members, and their raw-publish subscription."""
        self.is_ephemeral: Callable[[str], bool] = lambda room: False
        self.nc: CoreNats | None = None
        """The connection ephemeral rooms are subscribed on (set when the gateway serves)."""
        self._malformed = Malformed(
            RateLimitedLog(log), lambda kind: metrics.BUS_MALFORMED.labels(kind).inc()
        )

    def start_feeds(self, reader: Reader, route: Route | None = None) -> Feeds:
        """Feeds read from ``reader``, or from where ``route`` says each key is stored
        (one reader per history shard)."""
        self.feeds = Feeds(
            reader, self._deliver_stored, self.replay_buffer, route, self._subscribed
        )
        return self.feeds

    async def _subscribed(self, feed: Feed) -> None:
        """A room's feed reads its position once its room's messages reach this gateway."""
        if self.interest is not None and feed.subject[0] == "h":  # not a user's inbox
            await self.interest.wait(feed.name)

    async def subscribe_ephemeral(self, room: str) -> None:
        """The raw-publish subscription of an ephemeral room with local members (one per room)."""
        if room not in self.ephemeral or self.ephemeral[room] is not None:
            return
        assert self.nc is not None, "the gateway is not serving yet"
        sub = await self.nc.subscribe(
            subjects.room_message(room),
            cb=self.on_ephemeral,
            pending_msgs_limit=PENDING_MSGS,
            pending_bytes_limit=PENDING_BYTES,
        )
        if room in self.ephemeral and self.ephemeral[room] is None:
            self.ephemeral[room] = sub
        else:  # left meanwhile, or another join subscribed first
            await _unsubscribe(sub)

    def feeds_heal(self) -> None:
        if self.feeds is not None:
            self.feeds.heal_all()

    def reset_epoch(self, epoch: str, reader: Reader | None = None) -> None:
        """The stream (``reader``'s; None: every one) was recreated: each of its rooms starts
        again at its new position, and their members are told (``joined`` with
        ``recovered: false``, reason ``epoch``)."""
        if self.feeds is None:
            return
        for feed in self.feeds.reset_all(reader):
            if feed.subject.startswith("history."):
                asyncio.get_running_loop().create_task(self._announce_epoch(feed, epoch))

    async def _announce_epoch(self, feed: Feed, epoch: str) -> None:
        await feed.ready.wait()
        data = {"room": feed.name, "epoch": epoch, "seq": feed.last}
        self.deliver(
            feed.name, encode_frame("joined", {**data, "recovered": False, "reason": "epoch"})
        )

    def room_feed(self, room: str) -> Feed | None:
        return None if self.feeds is None else self.feeds.feeds.get(subjects.history(room))

    # -- membership -------------------------------------------------------------------
    def add(self, conn: Conn) -> None:
        self.conns.add(conn)
        if conn.dms:  # self-chosen names get no DMs (unless INSECURE_DMS)
            mine = self.users.setdefault(conn.user, set())
            mine.add(conn)
            if len(mine) == 1 and self.feeds is not None:
                inbox = subjects.inbox(conn.user)
                self.feeds.open(inbox, conn.user, inbox, inbox_frame, opened_live=True)
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
                if self.feeds is not None:
                    self.feeds.close(subjects.inbox(conn.user))
        self.conns.discard(conn)
        metrics.CONNECTIONS.set(len(self.conns))
        return rooms

    def join(self, conn: Conn, room: str) -> bool:
        """Add ``conn`` to ``room``; False when it already was a member."""
        if room in conn.rooms:
            return False
        conn.rooms.add(room)
        members = self.rooms.setdefault(room, set())
        members.add(conn)
        if len(members) == 1:
            if self.interest is not None:
                self.interest.want(room)
            if self.is_ephemeral(room):
                self.ephemeral.setdefault(room, None)
            elif self.feeds is not None:
                stored = subjects.history(room)
                self.feeds.open(stored, room, stored, room_frame)
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
        conn.catching.pop(subjects.history(room), None)
        conn.floor.pop(subjects.history(room), None)
        members = self.rooms.get(room)
        if members is not None:
            members.discard(conn)
            if not members:
                del self.rooms[room]
                if self.feeds is not None:
                    self.feeds.close(subjects.history(room))
                if self.interest is not None:
                    self.interest.unwant(room)
                if room in self.ephemeral:
                    sub = self.ephemeral.pop(room)
                    if sub is not None:
                        asyncio.get_running_loop().create_task(_unsubscribe(sub))
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
    def deliver(self, room: str, frame: bytes) -> int:
        """Offer one encoded frame (live only: presence, typing, ephemeral messages) to every
        local member of ``room``; returns how many took it.

        The WebSocket frame is built here, once, and written as is to every member's socket.
        """
        members = self.rooms.get(room)
        if not members:
            return 0
        wire = text_frame(frame)
        n = 0
        for conn in tuple(members):
            n += conn.offer(frame, None, wire)
        metrics.DELIVERED.inc(n)
        return n

    def _deliver_stored(self, feed: Feed, seq: int, prev: int, frame: bytes) -> None:
        """A feed's next message to its local members: held for those still catching up,
        skipped for those whose replay already went past it."""
        key = feed.subject
        room = feed.name if key[0] == "h" else None  # a room's feed, or a user's inbox
        members = self.rooms.get(feed.name) if room is not None else self.users.get(feed.name)
        if not members:
            return
        wire = text_frame(frame)
        n = 0
        for conn in tuple(members):
            if conn.catching:
                catch = conn.catching.get(key)
                if catch is not None:
                    catch.add(seq, prev, frame)
                    continue
            if conn.floor:
                floor = conn.floor.get(key)
                if floor is not None:
                    if seq <= floor:
                        continue
                    del conn.floor[key]
            n += conn.offer(frame, seq, wire, room)
        metrics.DELIVERED.inc(n)

    def _stored(self, msg: Msg, kind: str) -> None:
        """A message republished by the stream after it was stored: to its feed, if any."""
        key = msg.subject[len(subjects.STORED_PREFIX) + 1 :]
        feeds = self.feeds
        if feeds is None or key not in feeds.feeds:
            return  # nobody here is interested: no parse, no encode
        start = time.perf_counter()
        headers = msg.headers or {}
        try:
            seq = int(headers["Nats-Sequence"])
            prev = int(headers.get("Nats-Last-Sequence") or 0)
        except (KeyError, ValueError):
            self._malformed.drop("bad_stored", "stored message without its sequence", metric=kind)
            return
        feeds.offer(key, seq, prev, msg.data)
        metrics.FANOUT_SECONDS.observe(time.perf_counter() - start)

    async def on_stored_room(self, msg: Msg) -> None:
        """Callback of ``stored.history.*`` (or one room's ``stored.history.<room>``): stored
        room messages, in stream order."""
        metrics.BUS_IN_ROOM_MESSAGE.inc()
        self._stored(msg, "room_message")

    async def on_stored_inbox(self, msg: Msg) -> None:
        """Callback of ``stored.inbox.*``: stored direct-message copies of local users."""
        metrics.BUS_IN.labels("user_message").inc()
        self._stored(msg, "user_message")

    async def on_event(self, msg: Msg) -> None:
        """Callback of ``event.>``: to the local connections subscribed to that event type."""
        metrics.BUS_IN.labels("event").inc()
        kind = subjects.parse_event(msg.subject)
        if kind is None:
            self._malformed.drop(
                "bad_event", "dropped event", metric="event", subject=msg.subject[:200]
            )
            return
        members = self.events.get(kind)
        if not members:
            return
        try:
            orjson.loads(msg.data)  # any JSON value; checked once, spliced in as is
        except orjson.JSONDecodeError:
            self._malformed.drop(
                "bad_event", "dropped event: payload is not JSON", metric="event", event=kind
            )
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
        """Callback of ``room.*.presence`` (or one room's ``room.<room>.presence``):
        join/leave/typing to local members."""
        metrics.BUS_IN.labels("room_presence").inc()
        room = subjects.parse_room_presence(msg.subject)
        if room is None or room not in self.rooms:
            return
        if self.interest is not None and self.interest.repeated(msg.subject, msg.data):
            return  # a switch of subscriptions brought it both ways
        try:
            event = PresenceEvent.model_validate_json(msg.data)
            if event.room != room:
                raise ValueError("event room does not match subject")
        except ValueError as exc:
            self._malformed.drop(
                "bad_presence",
                "dropped malformed presence event",
                metric="room_presence",
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

    async def on_ephemeral(self, msg: Msg) -> None:
        """Callback of one ephemeral room's ``room.<room>.message``: live, never stored."""
        metrics.BUS_IN.labels("ephemeral").inc()
        room = subjects.parse_room_message(msg.subject)
        if room is None or room not in self.rooms:
            return
        chat = self._malformed.parse(
            "bad_payload",
            msg.subject,
            lambda: parse_bus_chat(msg.data, room),
            metric="room_message",
        )
        if chat is None:
            return
        self.deliver(
            room, encode_frame("chat.message", chat.model_dump(mode="json", exclude_none=True))
        )


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception:  # the connection is gone: so is the subscription
        pass
