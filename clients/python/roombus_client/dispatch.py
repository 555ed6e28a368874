"""Frames from the gateway: what each one does to the client's state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import RequestFailed, SendRefused
from .types import Ack, ChatMessage, DirectMessage, Event, Joined, PresenceChange, Typing

if TYPE_CHECKING:
    from .connection import Connection

RETRY_SEND = frozenset({"unavailable", "not_stored", "rate_limited", "internal"})
"""Refusals a resend with the same client_id may cure (stored once either way)."""


class Lost(Exception):
    """The connection dropped while a query waited: ask again on the next one."""


@dataclass
class Out:
    """A stored send (room message or DM) awaiting its ack."""

    kind: str
    data: dict[str, object]
    room: str | None
    future: asyncio.Future[Ack]
    tries: int = 0
    sent: int = 0


async def dispatch(c: Connection, kind: str, d: dict[str, Any]) -> None:
    room = c.rooms.get(str(d.get("room")))
    if kind == "hello":
        c.me, c.verified = str(d.get("user")), bool(d.get("verified"))
        await _on_hello(c)
    elif kind == "joined":
        await _on_joined(c, d)
    elif kind == "chat.message" and room is not None:
        if not room.on_message(ChatMessage.from_wire(d)):
            await c.send_frame("leave", {"room": room.name})
            await c._rejoin(room)
    elif kind == "ack":
        out = c._outbox.get(str(d.get("client_id")))
        if out is not None and not out.future.done():
            seq = d.get("seq")
            seq = seq if isinstance(seq, int) else None
            out.future.set_result(Ack(str(d["client_id"]), str(d["id"]), seq))
    elif kind == "error":
        await _on_error(c, d)
    elif kind == "presence" and room is not None and "event" in d:
        count = d.get("count")
        ev = PresenceChange(room.name, str(d["event"]), str(d.get("user")), count)
        room.on_signal(ev)
    elif kind in ("presence", "history", "dm.history"):
        fut = c._replies.get(kind)
        if fut is not None and not fut.done():
            fut.set_result(d)
    elif kind == "typing" and room is not None:
        room.on_signal(Typing(room.name, str(d.get("user"))))
    elif kind == "dm":
        dm = DirectMessage.from_wire(d)
        if dm.seq is None or dm.seq > c._dm_seq:
            c._dm_seq = dm.seq or c._dm_seq
            c._dms.put(dm)
    elif kind == "event":
        ev2 = Event(str(d.get("event")), d.get("payload"))
        for types, box in c._event_boxes:
            if ev2.event in types:
                box.put(ev2)


async def _on_hello(c: Connection) -> None:
    c._ready.set()
    for room in list(c.rooms.values()):
        await c._rejoin(room)
    if c._events:
        await c.send_frame("subscribe", {"events": sorted(c._events)})
    for out in list(c._outbox.values()):
        if out.room is None:
            await c._transmit(out)


async def _on_joined(c: Connection, d: dict[str, Any]) -> None:
    name = str(d.get("room"))
    if name in c._joining:
        c._joining.remove(name)
    room = c.rooms.get(name)
    if room is None:
        return
    room.on_joined(Joined.from_wire(d))
    waiter = c._join_waiters.pop(name, None)
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
    for out in list(c._outbox.values()):
        if out.room == name:
            await c._transmit(out)


async def _on_error(c: Connection, d: dict[str, Any]) -> None:
    code, message = str(d.get("code")), str(d.get("message", ""))
    out = c._outbox.get(str(d.get("client_id")))
    if out is not None:
        if code in RETRY_SEND:
            out.tries += 1
            c._spawn(c._transmit(out), min(5.0, 0.25 * 2**out.tries))
        elif not out.future.done():
            out.future.set_exception(SendRefused(str(d["client_id"]), code, message))
        return
    frame = d.get("frame")
    if frame == "join" and c._joining:
        room = c.rooms.get(c._joining.pop(0))
        if room is not None and code in RETRY_SEND:
            c._spawn(c._rejoin(room), 1.0)
        elif room is not None:
            c.rooms.pop(room.name, None)
            room.left = True
            room.wake()
            waiter = c._join_waiters.pop(room.name, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(RequestFailed(code, message))
    elif d.get("left") and (room := c.rooms.get(str(d.get("room")))) is not None:
        room.disconnected()  # a replay was cut short: rejoin from where we are
        c._spawn(c._rejoin(room), 0.5)
    elif isinstance(frame, str) and (fut := c._replies.get(frame)) is not None:
        if not fut.done():
            fut.set_exception(RequestFailed(code, message))
