"""A core-NATS stand-in for in-process tests of the gateway's subscriptions: subjects with
``*`` / ``>`` wildcards, one queue and one task per subscription calling its callback (as
nats-py does), and a publish that reaches every matching subscription at once — so two
overlapping subscriptions both get a copy, as on a real server.

It models what :class:`gateway.interest.Interest` relies on: a subscription is in place as
soon as ``subscribe`` returns (the server handles one connection's commands in order), and
``flush`` returns once what was published before it is in the subscriptions' queues.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

Callback = Callable[[Any], Awaitable[None]]


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(want) == len(got)


class MemSub:
    """One subscription: its queue, and the task that hands each message to the callback."""

    def __init__(self, bus: MemBus, sid: int, subject: str, cb: Callback) -> None:
        self.bus, self.sid, self.subject, self.cb = bus, sid, subject, cb
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.received = 0
        self.running = asyncio.Event()
        """Cleared: the messages wait in the queue (a subscription whose task is behind)."""
        self.running.set()
        self.held: Any = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    @property
    def pending_msgs(self) -> int:
        return self.queue.qsize() + (self.held is not None)

    @property
    def delivered(self) -> int:
        return self.received

    async def _run(self) -> None:
        while True:
            msg = await self.queue.get()
            if not self.running.is_set():
                self.held = msg  # still pending: taken from the queue, not handed on
                await self.running.wait()
                self.held = None
            try:
                await self.cb(msg)
            finally:
                self.queue.task_done()

    async def unsubscribe(self) -> None:
        self.bus.subs.pop(self.sid, None)
        self.bus.unsubscribed.append(self.subject)
        self.task.cancel()


class MemBus:
    """The part of nats-py's client the gateway's subscriptions use."""

    def __init__(self) -> None:
        self.subs: dict[int, MemSub] = {}
        self.subscribed: list[str] = []
        """Every subject subscribed to, in order (repeats included)."""
        self.unsubscribed: list[str] = []
        self.is_closed = False
        self.flushing = asyncio.Event()
        """Cleared: a flush waits (a slow PONG), to catch a switch half-way."""
        self.flushing.set()
        self.subscribing = asyncio.Event()
        """Cleared: a subscribe waits before it is in place (a full pending buffer)."""
        self.subscribing.set()
        self._sid = 0

    async def subscribe(self, subject: str, cb: Callback, **_limits: int) -> MemSub:
        await self.subscribing.wait()
        self._sid += 1
        sub = self.subs[self._sid] = MemSub(self, self._sid, subject, cb)
        self.subscribed.append(subject)
        return sub

    async def flush(self, timeout: float = 10) -> None:
        await asyncio.sleep(0)
        await self.flushing.wait()

    def sub(self, subject: str) -> MemSub:
        """The subscription to exactly ``subject``."""
        (found,) = [s for s in self.subs.values() if s.subject == subject]
        return found

    def subjects(self) -> list[str]:
        """The subjects subscribed to now."""
        return sorted(sub.subject for sub in self.subs.values())

    def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
        """Queue a copy for every matching subscription; returns how many."""
        n = 0
        for sub in list(self.subs.values()):
            if matches(sub.subject, subject):
                sub.received += 1
                sub.queue.put_nowait(SimpleNamespace(subject=subject, data=data, headers=headers))
                n += 1
        return n

    async def close(self) -> None:
        self.is_closed = True
        for sub in list(self.subs.values()):
            sub.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sub.task
        self.subs.clear()
