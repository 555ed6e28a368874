"""A core-NATS stand-in for in-process tests of the gateway (``services.bus.CoreNats``):
subjects with ``*`` / ``>`` wildcards, one queue and one task per subscription calling its
callback (as nats-py does), a publish that reaches every matching subscription at once — so
two overlapping subscriptions both get a copy, as on a real server — queue groups (one member
of a group gets each message), and requests (a reply inbox; "no responders" when nothing
listens, a timeout when nothing answers).

It models what :class:`gateway.interest.Interest` relies on: a subscription is in place as
soon as ``subscribe`` returns (the server handles one connection's commands in order), and
``flush`` returns once what was published before it is in the subscriptions' queues.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

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


class MemMsg:
    """A message as a subscription's callback gets it (what the gateway reads of nats-py's)."""

    __slots__ = ("bus", "subject", "data", "headers", "reply")

    def __init__(
        self, bus: MemBus, subject: str, data: bytes, headers: dict[str, str] | None, reply: str
    ) -> None:
        self.bus, self.subject, self.data, self.headers, self.reply = (
            bus,
            subject,
            data,
            headers,
            reply,
        )

    async def respond(self, data: bytes) -> None:
        if self.reply:
            self.bus.put(self.reply, data)


class MemSub:
    """One subscription: its queue, and the task that hands each message to the callback."""

    def __init__(self, bus: MemBus, sid: int, subject: str, cb: Callback) -> None:
        self.bus, self.sid, self.subject, self.cb = bus, sid, subject, cb
        self.queue_group = ""
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
        self._inbox = 0
        self._replies: dict[str, asyncio.Future[MemMsg]] = {}

    @property
    def is_connected(self) -> bool:
        return not self.is_closed

    async def subscribe(
        self, subject: str, queue: str = "", cb: Callback | None = None, **_limits: Any
    ) -> MemSub:
        assert cb is not None, "MemBus subscriptions take a callback"
        await self.subscribing.wait()
        self._sid += 1
        sub = self.subs[self._sid] = MemSub(self, self._sid, subject, cb)
        sub.queue_group = queue
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

    def put(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None, reply: str = ""
    ) -> int:
        """Queue a copy for every matching subscription (one per queue group); returns how
        many. A publish to a request's reply inbox answers that request."""
        waiter = self._replies.pop(subject, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(MemMsg(self, subject, data, headers, ""))
            return 1
        n = 0
        groups: set[str] = set()
        for sub in list(self.subs.values()):
            if not matches(sub.subject, subject):
                continue
            if sub.queue_group:
                if sub.queue_group in groups:
                    continue
                groups.add(sub.queue_group)
            sub.received += 1
            sub.queue.put_nowait(MemMsg(self, subject, data, headers, reply))
            n += 1
        return n

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        self._check_open()
        self.put(subject, payload, headers, reply)

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 0.5,  # noqa: ASYNC109 - nats-py's signature
        old_style: bool = False,
        headers: dict[str, Any] | None = None,
    ) -> MemMsg:
        """Publish with a reply inbox and wait for the first answer."""
        self._check_open()
        self._inbox += 1
        inbox = f"_INBOX.mem.{self._inbox}"
        waiter: asyncio.Future[MemMsg] = asyncio.get_running_loop().create_future()
        self._replies[inbox] = waiter
        try:
            if not self.put(subject, payload, headers, inbox):
                raise NoRespondersError
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            raise NatsTimeoutError from None
        finally:
            self._replies.pop(inbox, None)

    def _check_open(self) -> None:
        if self.is_closed:
            raise ConnectionClosedError

    async def close(self) -> None:
        self.is_closed = True
        for sub in list(self.subs.values()):
            sub.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sub.task
        self.subs.clear()
