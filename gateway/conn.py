"""One client connection: a bounded outbound buffer drained by one writer task."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from proto.errors import CloseCode

from . import metrics

log = logging.getLogger("roombus.gateway.conn")

Send = Callable[[Any], Awaitable[None]]


class Conn:
    """A WebSocket client as the fan-out sees it.

    ``offer`` never blocks and never awaits: the frame is appended to a bounded
    buffer or dropped (counted) when the buffer is full. A client whose buffer
    stays full for ``slow_timeout`` seconds is disconnected with 4008.
    """

    __slots__ = (
        "user",
        "verified",
        "rooms",
        "closed",
        "close_code",
        "task",
        "shut_cancelled",
        "_send",
        "_buf",
        "_max",
        "_wake",
        "_full_since",
        "_slow_timeout",
        "_writer",
        "_space",
        "_started",
        "replaying",
        "events",
        "inflight",
    )

    def __init__(self, send: Send, user: str, verified: bool, maxlen: int, slow_timeout: float):
        self.user = user
        self.verified = verified
        self.rooms: set[str] = set()
        self.events: set[str] = set()
        self.closed = asyncio.Event()
        self.close_code: int = CloseCode.NORMAL
        self.task: asyncio.Task[Any] | None = None
        """The connection's own task, cancelled by :meth:`shut` to end a blocked read."""
        self.shut_cancelled = False
        self._send = send
        self._buf: deque[str] = deque()
        self._max = maxlen
        self._wake: asyncio.Event | None = None
        self._full_since: float | None = None
        self._slow_timeout = slow_timeout
        # Idle connections have no writer task: one is started when frames are queued and
        # ends when the buffer is empty (memory per idle connection matters at 10k+).
        self._writer: asyncio.Task[None] | None = None
        self._space: asyncio.Event | None = None
        self._started = False
        # room -> live (id, frame) pairs held back while a `since` replay is read
        self.replaying: dict[str, list[tuple[str, str]]] = {}
        self.inflight = asyncio.Semaphore(1)

    def start(self) -> None:
        self._started = True
        self._kick()

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()
        if self._started and self._writer is None and self._buf:
            self._writer = asyncio.create_task(self._write_loop())

    def offer(self, frame: str, msg_id: str | None = None) -> bool:
        """Queue ``frame`` for this client; False (and counted) when it was dropped."""
        if self.closed.is_set():
            return False
        if len(self._buf) >= self._max:
            metrics.DROPPED.labels("slow_client").inc()
            now = time.monotonic()
            if self._full_since is None:
                self._full_since = now
            elif now - self._full_since > self._slow_timeout:
                metrics.SLOW_DISCONNECTS.inc()
                log.warning("slow client disconnected", extra={"user": self.user})
                self.shut(CloseCode.SLOW_CONSUMER)
            return False
        self._buf.append(frame)
        self._kick()
        return True

    async def put(self, frame: str, msg_id: str | None = None) -> bool:
        """Queue ``frame``, waiting for buffer space (for replays, which must not drop).

        A client that makes no room within the slow-client timeout is disconnected.
        """
        while len(self._buf) >= self._max:
            if self.closed.is_set():
                return False
            if self._space is None:
                self._space = asyncio.Event()
            self._space.clear()
            try:
                async with asyncio.timeout(self._slow_timeout):
                    await self._space.wait()
            except TimeoutError:
                metrics.SLOW_DISCONNECTS.inc()
                self.shut(CloseCode.SLOW_CONSUMER)
                return False
        return self.offer(frame, msg_id)

    def made_room(self) -> None:
        """The buffer drained below half: the client reads again."""
        self._full_since = None
        if self._space is not None:
            self._space.set()

    def shut(self, code: int) -> None:
        """Close the connection with ``code`` (idempotent); interrupts its blocked read."""
        if self.closed.is_set():
            return
        self.close_code = code
        self.closed.set()
        task = self.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            self.shut_cancelled = True
            task.cancel()

    async def _write_loop(self) -> None:
        buf = self._buf
        try:
            while buf:
                frame = buf.popleft()
                await self._send({"type": "websocket.send", "text": frame})
                if len(buf) < self._max // 2:
                    self.made_room()
        except asyncio.CancelledError:
            raise
        except Exception:
            # The socket went away under us: the read side notices and cleans up.
            self.shut(CloseCode.GOING_AWAY)
        finally:
            self._writer = None

    async def stop(self) -> None:
        self._started = False
        writer = self._writer
        if writer is not None:
            writer.cancel()
            try:
                await writer
            except (asyncio.CancelledError, Exception):
                pass

    async def flush(self, within: float) -> None:
        """Wait (at most ``within`` seconds) until the buffer is written, before a close."""
        writer = self._writer
        if writer is not None:
            await asyncio.wait({writer}, timeout=within)
