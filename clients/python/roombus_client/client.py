"""The public client: rooms, sends, queries, direct messages, events."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from .connection import NAME_RE, Connection
from .mailbox import Mailbox
from .room import Room, wait_or_closed
from .types import Ack, DirectMessage, Event, Presence

__all__ = ["Client"]


class Client(Connection):
    """A roombus client: ``async with Client(urls, user="bot") as c:`` (or ``token=...``).

    ``urls`` is one gateway URL (``ws://host:port/ws``) or a list: the client moves to the
    next one when a connection fails or the gateway restarts (close 1012/1001: at once). It
    reconnects forever, with exponential backoff and full jitter (``backoff_base`` doubling
    up to ``backoff_max`` seconds). With a ``token`` (``ROOMBUS_AUTH=jwt``) it authenticates
    with a first ``auth`` frame; close 4001/4002 (bad or expired token) calls
    ``token_provider`` (sync or async, returns a fresh token), or without one stops the client:
    every pending call then raises :class:`Unauthorized`. Entering the ``async with`` waits
    for the first connection (wrap it in ``asyncio.timeout`` to bound that).

    asyncio only: synchronous code runs it with ``asyncio.run(main())``. No global state: any
    number of clients can live in one process.
    """

    async def __aenter__(self) -> Client:
        await super().__aenter__()
        return self

    async def join(self, room: str, *, since: int | None = None, epoch: str | None = None) -> Room:
        """Join ``room`` and wait for the gateway's ``joined``. With ``since`` (a ``seq``, and
        the ``epoch`` it came with) the room first yields every stored message after it."""
        if not NAME_RE.match(room):
            raise ValueError(f"bad room name {room!r}: 1-64 letters, digits, - or _")
        self.check_open()
        existing = self.rooms.get(room)
        if existing is not None:
            await self.wait_joined(existing)
            return existing
        r = Room(self, room, since, epoch)
        self.rooms[room] = r
        waiter = self._join_waiters[room] = asyncio.get_running_loop().create_future()
        await self._rejoin(r)
        await waiter
        return r

    async def wait_joined(self, room: Room) -> None:
        await wait_or_closed(room.is_joined, self._closed)
        self.check_open()

    async def leave(self, room: Room) -> None:
        """Leave ``room``: its iterators end; its unacked sends fail with ClientClosed."""
        room.left = True
        room.wake()
        self.rooms.pop(room.name, None)
        await self.send_frame("leave", {"room": room.name})

    async def presence(self, room: str) -> Presence:
        """Who is in ``room`` (joined by this client) now."""
        return await self.rooms[room].presence()

    async def dm(
        self, to: str, text: str, *, client_id: str | None = None, timeout: float = 30.0
    ) -> Ack:
        """Send a direct message to ``to``; returns its ack (stored in both inboxes). Needs a
        verified user (a token), unless the gateway runs with INSECURE_DMS. Resent like a
        room message until acked."""
        if not NAME_RE.match(to):
            raise ValueError(f"bad user id {to!r}")
        return await self.send_stored("dm", {"to": to, "text": text}, None, client_id, timeout)

    def direct_messages(self) -> Mailbox[DirectMessage]:
        """Direct messages to and from this user, live, each once (by inbox ``seq``):
        ``async for dm in c.direct_messages()``."""
        return self._dms

    async def dm_history(
        self, *, before: int | None = None, after: int | None = None, limit: int = 50
    ) -> list[DirectMessage]:
        """One page of this user's inbox (``seq`` cursors), oldest first."""
        data: dict[str, object] = {"limit": limit}
        if before is not None:
            data["before"] = before
        if after is not None:
            data["after"] = after
        reply = await self.request("dm.history", data)
        return [DirectMessage.from_wire(m) for m in reply.get("messages", [])]

    async def subscribe(self, events: Iterable[str]) -> Mailbox[Event]:
        """Subscribe to backend event types (``order.created``); returns their live stream.
        The subscription is renewed on every reconnect; events sent while disconnected are
        not replayed (events are live only)."""
        wanted = frozenset(events)
        box: Mailbox[Event] = Mailbox(1024, self.check_open)
        self._event_boxes.append((wanted, box))
        self._events |= wanted
        await self.send_frame("subscribe", {"events": sorted(wanted)})
        return box
