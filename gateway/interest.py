"""Which rooms' traffic reaches this gateway (``SUBSCRIBE``): every room's, through two
wildcards, or only its own rooms', through one subscription per room with local members — and
the switch between the two, which loses and repeats nothing.

Stored room messages (``stored.history.<room>``) and room presence (``room.<room>.presence``)
come either through ``stored.history.*`` and ``room.*.presence`` or, per room with local
members, through that room's own pair (only the presence one for an ephemeral room). Both ways
deliver into the same hub callbacks. What keeps delivery exact:

- A room's feed reads the room's position only once a subscription that delivers the room is
  sent (:meth:`Interest.wait`). NATS handles one connection's commands in order: the server
  has the subscription before it answers the read, so what is stored after the read comes
  live and what was stored before is in the read (anything else is a ``prev`` gap the feed
  heals).
- A switch subscribes the new way first and flushes (from then on every message comes both
  ways), keeps both a moment longer (``SWITCH_OVERLAP``: a message the server matched
  against the old subscriptions alone just before can still be on its way), lets the old
  subscriptions hand what they received to the callbacks, and only then drops them. The
  overlap repeats messages: stored ones are dropped by their ``seq`` (the feed's check),
  presence events by their bytes while the switch lasts.
- A room's own subscriptions outlive its last local member by ``SUBSCRIBE_LINGER`` seconds, so
  join/leave churn does not subscribe and unsubscribe again and again.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from proto import subjects
from services.bus import CoreNats

from . import metrics

if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger("roombus.gateway.interest")

PENDING_MSGS = 100_000
PENDING_BYTES = 64 * 1024 * 1024
"""Pending limits of every subscription: what a stalled event loop can queue up in the client."""
FLUSH_TIMEOUT = 5
"""Seconds a switch waits for its flush to come back before it tries again (NATS is away)."""
SWITCH_OVERLAP = 0.25
"""Seconds a switch keeps both ways once the server has the new subscriptions: a message
the server matched against the old ones alone just before can still reach us after the
flush (a publisher's routing races our SUB); it comes the old way within this."""
SEEN_MAX = 100_000
"""Presence events remembered while a switch delivers them both ways."""

Mode = Literal["wildcard", "rooms"]
Callback = Callable[[Msg], Awaitable[None]]

_dropped: weakref.WeakSet[Subscription] = weakref.WeakSet()
"""Subscriptions we unsubscribed: their queues are discarded, a switch waits on them no more."""


class _Room:
    """One room's own subscriptions."""

    __slots__ = ("subs", "sent", "linger")

    def __init__(self) -> None:
        self.subs: list[Subscription] = []
        self.sent = False
        """Its subscriptions are sent (a feed may read the room's position)."""
        self.linger: asyncio.TimerHandle | None = None


class Interest:
    """This gateway's subscriptions to stored room messages and room presence."""

    def __init__(self, hub: Hub, setting: str, linger: float, auto_rooms: int) -> None:
        self.hub = hub
        self.setting = setting
        self.linger = linger
        self.high = auto_rooms
        self.low = auto_rooms * 4 // 5
        self.mode: Mode = "wildcard" if setting == "wildcard" else "rooms"
        """How room traffic reaches this gateway now (what a new room's feed waits for)."""
        self.rooms: dict[str, _Room] = {}
        """Rooms with subscriptions of their own (lingering ones included)."""
        self._nc: CoreNats | None = None
        self._wild: list[Subscription] = []
        self._wild_sent = False
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._seen: dict[tuple[str, bytes], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, nc: CoreNats) -> None:
        self._nc = nc
        if self.mode == "wildcard":
            await self._subscribe_wildcards()
        self._show()

    def stop(self) -> None:
        for room in self.rooms.values():
            if room.linger is not None:
                room.linger.cancel()
        for task in list(self._tasks):
            task.cancel()

    # -- membership (the hub calls these) -----------------------------------------------
    def want(self, room: str) -> None:
        """``room`` has its first local member."""
        if self.mode == "rooms":
            self._room(room)
        self._rebalance()

    def unwant(self, room: str) -> None:
        """``room``'s last local member left."""
        own = self.rooms.get(room)
        if own is not None and self.mode == "rooms":
            self._linger(room, own)
        self._rebalance()

    async def wait(self, room: str) -> None:
        """Until a subscription that delivers ``room`` is sent (a feed reads its position
        only then)."""
        while not self._covers(room):
            await self._changed.wait()

    def repeated(self, subject: str, data: bytes) -> bool:
        """True for the second copy of a presence event while a switch delivers both ways
        (two events with the same bytes — the same ``ts`` to the microsecond — are one)."""
        seen = self._seen
        if seen is None:
            return False
        key = (subject, data)
        if key in seen:
            del seen[key]
            return True
        if len(seen) >= SEEN_MAX:
            del seen[next(iter(seen))]
        seen[key] = None
        return False

    # -- per-room subscriptions ----------------------------------------------------------
    def _covers(self, room: str) -> bool:
        if self.mode == "wildcard":
            return self._wild_sent
        own = self.rooms.get(room)
        return own is None or own.sent  # None: nobody here any more, nothing to wait for

    def _room(self, room: str) -> None:
        own = self.rooms.get(room)
        if own is None:
            own = self.rooms[room] = _Room()
            metrics.ROOM_SUBSCRIBES.inc()
            metrics.ROOM_SUBSCRIPTIONS.set(len(self.rooms))
            self._spawn(self._subscribe_room(room, own))
        elif own.linger is not None:  # back within the linger: still subscribed
            own.linger.cancel()
            own.linger = None

    async def _subscribe_room(self, room: str, own: _Room) -> None:
        hub = self.hub
        wanted: list[tuple[str, Callback]] = [(subjects.room_presence(room), hub.on_room_presence)]
        if not hub.is_ephemeral(room):  # an ephemeral room's messages have their own (hub)
            wanted.insert(0, (subjects.stored_room(room), hub.on_stored_room))
        try:
            for subject, callback in wanted:
                own.subs.append(await self._subscribe(subject, callback))
        except Exception as exc:  # the connection is closing: the gateway is stopping
            log.warning("room subscription failed", extra={"room": room, "error": repr(exc)})
        own.sent = True
        self._pulse()
        if self.rooms.get(room) is not own:  # dropped meanwhile (linger expired, a switch)
            await _unsubscribe(own.subs)

    def _linger(self, room: str, own: _Room) -> None:
        if self.linger > 0:
            own.linger = asyncio.get_running_loop().call_later(self.linger, self._expire, room, own)
        else:
            self._expire(room, own)

    def _expire(self, room: str, own: _Room) -> None:
        own.linger = None
        if self.mode != "rooms" or self.rooms.get(room) is not own or room in self.hub.rooms:
            return  # (a switch to the wildcards drops it once they are in)
        del self.rooms[room]
        metrics.ROOM_SUBSCRIPTIONS.set(len(self.rooms))
        if own.sent:  # else its subscribing task drops them once sent
            # Nobody here needs what they still hold: a plain unsubscribe.
            self._spawn(_unsubscribe(own.subs))

    async def _subscribe(self, subject: str, callback: Callback) -> Subscription:
        assert self._nc is not None
        return await self._nc.subscribe(
            subject, cb=callback, pending_msgs_limit=PENDING_MSGS, pending_bytes_limit=PENDING_BYTES
        )

    async def _subscribe_wildcards(self) -> None:
        if self._wild:
            return
        hub = self.hub
        self._wild = [
            await self._subscribe(subjects.STORED_ROOM_WILDCARD, hub.on_stored_room),
            await self._subscribe(subjects.ROOM_PRESENCE_WILDCARD, hub.on_room_presence),
        ]
        self._wild_sent = True
        self._pulse()

    # -- auto: the switch ----------------------------------------------------------------
    def _rebalance(self) -> None:
        """``auto``: per-room subscriptions while at most ``high`` rooms have local members,
        the wildcards above it, per-room again at or below ``low`` (80%)."""
        if self.setting != "auto":
            return
        n = len(self.hub.rooms)
        if self.mode == "rooms" and n > self.high:
            self._switch("wildcard")
        elif self.mode == "wildcard" and n <= self.low:
            self._switch("rooms")

    def _switch(self, mode: Mode) -> None:
        self.mode = mode
        metrics.SUBSCRIBE_SWITCHES.labels(mode).inc()
        log.info("room subscriptions switch", extra={"to": mode, "rooms": len(self.hub.rooms)})
        if self._seen is None:
            self._seen = {}
        if mode == "rooms":
            for room in self.hub.rooms:
                self._room(room)
            for room, own in self.rooms.items():
                if room not in self.hub.rooms and own.linger is None:
                    self._linger(room, own)  # a room left while the wildcards were coming in
        else:
            for own in self.rooms.values():
                if own.linger is not None:  # the switch drops them all once the wildcards are in
                    own.linger.cancel()
                    own.linger = None
        self._show()
        self._pulse()
        self._spawn(self._converge())

    async def _converge(self) -> None:
        """Make the subscriptions what ``self.mode`` says, the new way first (one switch at a
        time; a switch decided meanwhile is taken up by the same loop)."""
        async with self._lock:
            while True:
                try:
                    if await self._converge_once():
                        self._seen = None
                        return
                except Exception as exc:
                    if self._nc is None or self._nc.is_closed:
                        return
                    log.warning("room subscriptions switch failed", extra={"error": repr(exc)})
                    await asyncio.sleep(0.5)

    async def _converge_once(self) -> bool:
        """One try; True once the subscriptions are what ``self.mode`` says."""
        mode = self.mode
        if mode == "wildcard":
            await self._subscribe_wildcards()
            new = list(self._wild)
            old = [s for own in self.rooms.values() for s in own.subs]
        else:
            while not all(own.sent for own in self.rooms.values()):
                await self._changed.wait()
            new = [s for own in self.rooms.values() for s in own.subs]
            old = list(self._wild)
        # The flush comes back after every message the server sent before it had the new
        # subscriptions (those came only the old way, and are in its queues now) — but for
        # one that a publisher's routing matched just before and sends just after: the
        # overlap waits for it.
        if not await self._flush():
            await asyncio.sleep(0.5)
            return False
        await asyncio.sleep(SWITCH_OVERLAP)
        await self._taken_in(old)
        if self.mode != mode:
            return False
        # From here on anything the old subscriptions get came the new way too.
        if mode == "wildcard":
            dropped, self.rooms = list(self.rooms.values()), {}
            old = [s for own in dropped for s in own.subs]
        else:
            old, self._wild, self._wild_sent = self._wild, [], False
        metrics.ROOM_SUBSCRIPTIONS.set(len(self.rooms))
        await _unsubscribe(old)
        # The presence copies of what the old way delivered: in the new queues by the flush;
        # once they are taken in, nothing comes twice any more.
        await self._flush()
        await self._taken_in(new)
        return self.mode == mode

    async def _taken_in(self, subs: list[Subscription]) -> None:
        """Until each of ``subs`` has handed its callback every message it had received when
        this was called (the callbacks never suspend: taken from the queue is delivered)."""
        marks = [(sub, sub.delivered) for sub in subs]
        while any(
            sub.delivered - sub.pending_msgs < mark and sub not in _dropped for sub, mark in marks
        ):
            if self._nc is None or self._nc.is_closed:
                return
            await asyncio.sleep(0.001)

    async def _flush(self) -> bool:
        nc = self._nc
        if nc is None or nc.is_closed:
            return False
        try:
            await nc.flush(FLUSH_TIMEOUT)
        except Exception:  # NATS is away: the switch waits for it (both ways stay)
            return False
        return True

    # -- plumbing ------------------------------------------------------------------------
    def _pulse(self) -> None:
        """Wake everything waiting on a change (a subscription sent, a switch)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _show(self) -> None:
        for mode in ("wildcard", "rooms"):
            metrics.SUBSCRIBE_MODE.labels(mode).set(1 if mode == self.mode else 0)
        metrics.ROOM_SUBSCRIPTIONS.set(len(self.rooms))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _unsubscribe(subs: list[Subscription]) -> None:
    for sub in subs:
        _dropped.add(sub)
        try:
            await sub.unsubscribe()
        except Exception:  # the connection is gone: so is the subscription
            pass
