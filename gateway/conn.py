"""One client connection: a bounded outbound buffer, written without a task per message."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from proto.errors import CloseCode

from . import metrics
from .wire import WireProtocol, text_frame

log = logging.getLogger("roombus.gateway.conn")

Send = Callable[[Any], Awaitable[None]]


class Catch:
    """Live frames of one room held for a connection while its replay is read, bounded in
    frames and bytes: past either they are dropped and the replay reads them from the stream
    instead (nothing is lost, memory stays bounded)."""

    __slots__ = ("rows", "overflow", "limit", "size", "max_bytes")

    def __init__(self, limit: int, max_bytes: int = 4 * 1024 * 1024) -> None:
        self.rows: list[tuple[int, int, bytes]] = []
        self.overflow = False
        self.limit = limit
        self.size = 0
        self.max_bytes = max_bytes

    def add(self, seq: int, prev: int, frame: bytes) -> None:
        if self.overflow:
            return
        if len(self.rows) >= self.limit or self.size + len(frame) > self.max_bytes:
            self.overflow = True
            self.rows.clear()
            self.size = 0
            metrics.DROPPED.labels("replay_buffer_reread").inc()
            return
        self.rows.append((seq, prev, frame))
        self.size += len(frame)


class Conn:
    """A WebSocket client as the fan-out sees it.

    ``offer`` never blocks and never awaits. With a :class:`WireProtocol` (the default
    server) a frame is written straight to the socket while its transport buffer is below
    the high-water mark; above it, frames wait in a buffer bounded in frames (``maxlen``) and
    in bytes (``max_bytes``) that the protocol's ``resume_writing`` drains. Without one
    (another uvicorn WebSocket implementation) a writer task sends the buffer through ASGI.
    When the buffer is full the frame is dropped (counted); a client whose buffer is still
    full ``slow_timeout`` seconds after the first drop is disconnected with 4008 and its
    socket aborted (``aborter``): a client that never reads gets no close handshake to hold
    the socket (and what was written to it) open.

    Frames are UTF-8 JSON ``bytes``, encoded once by the caller; a fan-out also passes the
    WebSocket frame it built once (``wire``), so N clients cost N socket writes.
    """

    __slots__ = (
        "user",
        "verified",
        "rooms",
        "is_closed",
        "close_code",
        "task",
        "shut_cancelled",
        "_send",
        "_wire",
        "_buf",
        "_max",
        "_bytes",
        "_max_bytes",
        "_slow_timer",
        "aborter",
        "dms",
        "_wake",
        "_full_since",
        "_slow_timeout",
        "_writer",
        "_space",
        "_drained",
        "_started",
        "catching",
        "floor",
        "events",
        "inflight",
        "last_seen",
    )

    def __init__(
        self,
        send: Send,
        user: str,
        verified: bool,
        maxlen: int,
        slow_timeout: float,
        wire: WireProtocol | None = None,
        max_bytes: int = 1024 * 1024,
    ):
        self.user = user
        self.verified = verified
        self.rooms: set[str] = set()
        self.events: set[str] = set()
        self.is_closed = False
        self.close_code: int = CloseCode.NORMAL
        self.task: asyncio.Task[Any] | None = None
        """The connection's own task, cancelled by :meth:`shut` to end a blocked read."""
        self.shut_cancelled = False
        self._send = send
        self._wire = wire
        # Frames waiting for the socket: wire frames (fast path) or payloads (ASGI path).
        # (None until the first frame has to wait: most connections never need one.)
        self._buf: deque[bytes] | None = None
        self._max = maxlen
        self._bytes = 0
        self._max_bytes = max_bytes
        self._slow_timer: asyncio.TimerHandle | None = None
        self.aborter: Callable[[], None] | None = wire.abort if wire is not None else None
        """Drops the socket at once (no close handshake): set when the server offers one."""
        self.dms = True
        """Direct messages to ``user`` reach this connection (off for unverified names)."""
        self._wake: asyncio.Event | None = None
        self._full_since: float | None = None
        self._slow_timeout = slow_timeout
        # Idle connections have no writer task: on the ASGI path one is started when frames
        # are queued and ends when the buffer is empty (memory per idle connection matters).
        self._writer: asyncio.Task[None] | None = None
        self._space: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._started = False
        # stream subject -> live frames held back while a `since` replay is read
        self.catching: dict[str, Catch] = {}
        # stream subject -> seq a replay reached ahead of the feed: skip up to it
        self.floor: dict[str, int] = {}
        self.inflight = asyncio.Semaphore(1)
        self.last_seen: float | None = None
        """When the client last sent a frame (monotonic); None: no idle timeout (SSE)."""

    def start(self) -> None:
        self._started = True
        if self._wire is not None:
            self._wire.on_writable = self._drain
        self._kick()

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()
        if self._wire is not None:
            return
        if self._started and self._writer is None and self._buf:
            self._writer = asyncio.create_task(self._write_loop())

    def offer(
        self,
        frame: bytes,
        cursor: int | None = None,
        wire: bytes | None = None,
        room: str | None = None,
    ) -> bool:
        """Send ``frame`` (or queue it); False (and counted) when it was dropped.

        ``cursor`` is the stream position of a stored message and ``room`` the room it is in
        (SSE sends them as ``id:``);
        ``wire`` is ``frame`` as a WebSocket text frame, when the caller built it already.
        """
        if self.is_closed:
            return False
        buf = self._buf
        fast = self._wire
        if fast is not None:
            if wire is None:
                wire = text_frame(frame)
            if not buf and self._started and fast.can_write():
                if not fast.write_frame(wire):
                    self.shut(CloseCode.GOING_AWAY)
                    return False
                return True
            frame = wire
        if buf is None:
            buf = self._buf = deque()
        elif self._full(len(frame)):
            metrics.DROPPED_SLOW_CLIENT.inc()
            if self._full_since is None:
                self._full_since = time.monotonic()
                self._slow_timer = asyncio.get_running_loop().call_later(
                    self._slow_timeout, self._too_slow
                )
            return False
        buf.append(frame)
        self._bytes += len(frame)
        self._kick()
        return True

    def _full(self, size: int) -> bool:
        """No room for a frame of ``size`` bytes (an empty buffer always takes one)."""
        buf = self._buf
        if not buf:
            return False
        return len(buf) >= self._max or self._bytes + size > self._max_bytes

    def _too_slow(self) -> None:
        self._slow_timer = None
        if self._full_since is None or self.is_closed:
            return
        metrics.SLOW_DISCONNECTS.inc()
        log.warning("slow client disconnected", extra={"user": self.user})
        self.shut(CloseCode.SLOW_CONSUMER)

    async def put(self, frame: bytes, cursor: int | None = None, room: str | None = None) -> bool:
        """Queue ``frame``, waiting for buffer space (for replays, which must not drop).

        A client that makes no room within the slow-client timeout is disconnected.
        """
        # (+14: the WebSocket frame header `offer` adds; a replayed frame must wait, not drop)
        while self._full(len(frame) + 14):
            if self.is_closed:
                return False
            if self._space is None:
                self._space = asyncio.Event()
            self._space.clear()
            try:
                async with asyncio.timeout(self._slow_timeout):
                    await self._space.wait()
            except TimeoutError:
                if not self.is_closed:
                    metrics.SLOW_DISCONNECTS.inc()
                    self.shut(CloseCode.SLOW_CONSUMER)
                return False
        return self.offer(frame, cursor, room=room)

    def made_room(self) -> None:
        """The buffer drained below half: the client reads again."""
        self._full_since = None
        if self._slow_timer is not None:
            self._slow_timer.cancel()
            self._slow_timer = None
        if self._space is not None:
            self._space.set()
        if not self._buf and self._drained is not None:
            self._drained.set()

    def _drain(self) -> None:
        """Fast path: the transport went below its low-water mark; write what waits."""
        fast, buf = self._wire, self._buf
        if fast is None or not buf:
            return
        while buf and fast.can_write():
            frame = buf.popleft()
            self._bytes -= len(frame)
            if not fast.write_frame(frame):
                buf.clear()
                self._bytes = 0
                self.shut(CloseCode.GOING_AWAY)
                break
        if self._below_half():
            self.made_room()

    def _below_half(self) -> bool:
        buf = self._buf
        return not buf or (len(buf) < self._max // 2 and self._bytes < self._max_bytes // 2)

    def take_all(self) -> bytes:
        """Everything buffered, as one chunk (the SSE writer's read)."""
        buf = self._buf
        if not buf:
            return b""
        chunk = b"".join(buf)
        buf.clear()
        self._bytes = 0
        self.made_room()
        return chunk

    def shut(self, code: int) -> None:
        """Close the connection with ``code`` (idempotent); interrupts its blocked read."""
        if self.is_closed:
            return
        self.close_code = code
        self.is_closed = True
        if self._slow_timer is not None:
            self._slow_timer.cancel()
            self._slow_timer = None
        if code == CloseCode.SLOW_CONSUMER:
            # It does not read: a close frame would wait behind what it never read.
            if self._buf:
                self._buf.clear()
                self._bytes = 0
            if self.aborter is not None:
                self.aborter()
        if self._wake is not None:
            self._wake.set()
        task = self.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            self.shut_cancelled = True
            task.cancel()

    async def _write_loop(self) -> None:
        buf = self._buf
        assert buf is not None
        try:
            while buf:
                frame = buf.popleft()
                self._bytes -= len(frame)
                await self._send({"type": "websocket.send", "text": frame.decode()})
                if self._below_half():
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
        if self._wire is not None:
            self._wire.on_writable = None
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
            return
        if self._wire is not None and self._buf:
            self._drained = self._drained or asyncio.Event()
            self._drained.clear()
            try:
                async with asyncio.timeout(within):
                    await self._drained.wait()
            except TimeoutError:
                pass
