"""One joined room: its messages in stream order, each once, across reconnects."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from .errors import ClientClosed, NotRecovered
from .mailbox import Mailbox
from .types import Ack, ChatMessage, Joined, Presence, PresenceChange, Typing

if TYPE_CHECKING:
    from .client import Client

SIGNALS_MAX = 256
"""Typing and presence changes kept for a reader that does not read (the oldest go first)."""


class Room:
    """A room this client is in. ``async for msg in room`` yields every stored message once,
    in stream order (by ``seq``), across reconnects; it raises :class:`NotRecovered` once
    where messages may be missing, and iterating again goes on from there.

    Made by :meth:`Client.join`; never construct one yourself.
    """

    def __init__(self, client: Client, name: str, since: int | None, epoch: str | None) -> None:
        self._client = client
        self.name = name
        self.seq: int | None = since
        """The ``seq`` of the last message delivered (or the position the last join gave)."""
        self.epoch = epoch
        self.joined: Joined | None = None
        """The last ``joined`` answer (members, epoch, whether it recovered)."""
        self.ephemeral = False
        self.duplicates = 0
        """Messages dropped because they were delivered already (replay and live overlap)."""
        self.gaps = 0
        """Times a ``prev`` did not link and the room was rejoined to heal (0 in practice)."""
        self.asked_since: int | None = None
        self.is_joined = asyncio.Event()
        self.resyncing = False
        self.left = False
        self._queue: deque[ChatMessage | NotRecovered] = deque()
        self._signals: Mailbox[Typing | PresenceChange] = Mailbox(SIGNALS_MAX, client.check_open)
        self._wake = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Room {self.name} seq={self.seq} epoch={self.epoch}>"

    # -- what the connection feeds in --------------------------------------------------
    def join_data(self) -> dict[str, object]:
        data: dict[str, object] = {"room": self.name}
        if self.seq is not None and not self.ephemeral:
            data["since"] = self.seq
            if self.epoch is not None:
                data["epoch"] = self.epoch
        self.asked_since = self.seq if "since" in data else None
        return data

    def on_joined(self, j: Joined) -> None:
        self.joined = j
        self.ephemeral = j.ephemeral
        if not j.ephemeral:
            asked = self.asked_since is not None or j.reason == "epoch"
            if j.recovered is False and asked:
                self._put(NotRecovered(self.name, j.reason or "unknown", j.seq, j.missed))
            if j.seq is not None:
                self.seq = j.seq
            self.epoch = j.epoch or self.epoch
        self.asked_since = None
        self.resyncing = False
        self.is_joined.set()

    def on_message(self, m: ChatMessage) -> bool:
        """Queue ``m`` unless it was delivered already; False when the room must rejoin."""
        if m.seq is None:  # ephemeral: no order to keep
            self._put(m)
            return True
        if self.resyncing or not self.is_joined.is_set():
            return True  # the rejoin's replay brings it
        if self.seq is not None and m.seq <= self.seq:
            self.duplicates += 1
            return True
        if self.seq is not None and m.prev is not None and m.prev != self.seq:
            # A message is missing before this one: never skip it, rejoin from where we are.
            self.gaps += 1
            self.resyncing = True
            return False
        self.seq = m.seq
        self._put(m)
        return True

    def on_signal(self, s: Typing | PresenceChange) -> None:
        self._signals.put(s)

    def disconnected(self) -> None:
        self.is_joined.clear()
        self.resyncing = False

    def wake(self) -> None:
        self._wake.set()
        self._signals.closed = self.left
        self._signals.wake()

    def _put(self, item: ChatMessage | NotRecovered) -> None:
        self._queue.append(item)
        self._wake.set()

    # -- the public API ----------------------------------------------------------------
    def __aiter__(self) -> Room:
        return self

    async def __anext__(self) -> ChatMessage:
        while not self._queue:
            if self.left:
                raise StopAsyncIteration
            self._client.check_open()
            self._wake.clear()
            await self._wake.wait()
        item = self._queue.popleft()
        if isinstance(item, NotRecovered):
            raise item
        return item

    async def send(self, text: str, *, client_id: str | None = None, timeout: float = 30.0) -> Ack:
        """Send ``text``; returns once it is stored. Survives reconnects: until acked it is
        resent with the same ``client_id`` (stored once). Raises :class:`SendTimeout` after
        ``timeout`` seconds, :class:`SendRefused` when the gateway refuses it for good."""
        data: dict[str, object] = {"room": self.name, "text": text}
        return await self._client.send_stored("chat.message", data, self.name, client_id, timeout)

    async def history(
        self, *, before: int | None = None, limit: int = 50
    ) -> AsyncIterator[ChatMessage]:
        """Older messages, newest first, paging backwards (``limit`` per request) from
        ``before`` (a ``seq``; the newest without it) to the room's first stored message."""
        await self._client.wait_joined(self)
        cursor = before
        while True:
            data: dict[str, object] = {"room": self.name, "limit": limit}
            if cursor is not None:
                data["before"] = cursor
            reply = await self._client.request("history", data)
            page = [ChatMessage.from_wire(m) for m in reply.get("messages", [])]
            for m in reversed(page):
                yield m
            if not reply.get("has_more") or not page or page[0].seq is None:
                return
            cursor = page[0].seq

    async def presence(self) -> Presence:
        """Who is in the room now, across every gateway."""
        await self._client.wait_joined(self)
        reply = await self._client.request("presence", {"room": self.name})
        members = tuple(str(u) for u in reply.get("members", []))
        return Presence(self.name, members, int(reply.get("count", len(members))))

    async def typing(self) -> None:
        """Tell the room this user is typing (dropped while offline; the gateway rate-limits)."""
        await self._client.send_frame("typing", {"room": self.name})

    def signals(self) -> Mailbox[Typing | PresenceChange]:
        """Typing hints and arrivals/departures, live (the newest 256 kept while unread):
        ``async for sig in room.signals()``."""
        return self._signals

    async def leave(self) -> None:
        """Leave the room; its iterators end."""
        await self._client.leave(self)


async def wait_or_closed(event: asyncio.Event, closed: asyncio.Event) -> None:
    """Wait for ``event``; raise ClientClosed if ``closed`` is set first."""
    if event.is_set():
        return
    waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(closed.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    if not event.is_set():
        raise ClientClosed("the client was closed")
