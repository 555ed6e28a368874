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
        "_send",
        "_buf",
        "_max",
        "_wake",
        "_full_since",
        "_slow_timeout",
        "_writer",
        "_drained",
        "_space",
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
        self._send = send
        self._buf: deque[str] = deque()
        self._max = maxlen
        self._wake = asyncio.Event()
        self._full_since: float | None = None
        self._slow_timeout = slow_timeout
        self._writer: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()
        self._space = asyncio.Event()
        # room -> live (id, frame) pairs held back while a `since` replay is read
        self.replaying: dict[str, list[tuple[str, str]]] = {}
        self.inflight = asyncio.Semaphore(1)

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name=f"writer-{self.user}")

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
        self._drained.clear()
        self._wake.set()
        return True

    async def put(self, frame: str, msg_id: str | None = None) -> bool:
        """Queue ``frame``, waiting for buffer space (for replays, which must not drop).

        A client that makes no room within the slow-client timeout is disconnected.
        """
        while len(self._buf) >= self._max:
            if self.closed.is_set():
                return False
            self._space.clear()
            try:
                async with asyncio.timeout(self._slow_timeout):
                    await self._space.wait()
            except TimeoutError:
                metrics.SLOW_DISCONNECTS.inc()
                self.shut(CloseCode.SLOW_CONSUMER)
                return False
        return self.offer(frame, msg_id)

    def shut(self, code: int) -> None:
        """Ask the connection to close with ``code`` (idempotent)."""
        if not self.closed.is_set():
            self.close_code = code
            self.closed.set()

    async def _write_loop(self) -> None:
        buf = self._buf
        try:
            while True:
                await self._wake.wait()
                while buf:
                    frame = buf.popleft()
                    await self._send({"type": "websocket.send", "text": frame})
                    if len(buf) < self._max // 2:
                        self._full_since = None
                        self._space.set()
                self._wake.clear()
                self._drained.set()
        except asyncio.CancelledError:
            raise
        except Exception:
            # The socket went away under us: the read side notices and cleans up.
            self.shut(CloseCode.GOING_AWAY)

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            try:
                await self._writer
            except (asyncio.CancelledError, Exception):
                pass

    async def flush(self, within: float) -> None:
        """Wait (at most ``within`` seconds) until the buffer is written, before a close."""
        if not self._buf or self._writer is None or self._writer.done():
            return
        drained = asyncio.ensure_future(self._drained.wait())
        await asyncio.wait({self._writer, drained}, timeout=within, return_when="FIRST_COMPLETED")
        drained.cancel()
