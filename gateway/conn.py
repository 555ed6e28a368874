"""One client connection: a bounded outbound buffer, written without a task per message."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from proto.errors import CloseCode

from . import metrics
from .framing import text_frame

log = logging.getLogger("roombus.gateway.conn")


class Sink(Protocol):
    """The way out of one connection's buffer.

    A sink that can write without waiting (``can_write``) takes frames in :meth:`write`,
    straight from ``Conn.offer`` while nothing waits, and calls ``Conn.drain`` when it can take
    more; one that cannot (``can_write`` is always False) is told by :meth:`wake` that frames
    wait, and pulls them itself.
    """

    @property
    def framed(self) -> bool:
        """The sink writes WebSocket frames: a payload is framed before it is written or
        buffered (once per fan-out, when the caller passes the frame it built)."""

    @property
    def abort(self) -> Callable[[], None] | None:
        """Drops the socket at once (no close handshake), when the server offers it."""

    def start(self, conn: Conn) -> None:
        """Frames may flow from ``conn``."""

    def can_write(self) -> bool:
        """A write now would not block."""

    def write(self, data: bytes) -> bool:
        """Write ``data`` now (only when :meth:`can_write`); False once the socket is gone."""

    def wake(self) -> None:
        """Frames wait in the buffer, or the connection closed: a sink that pulls looks."""

    async def stop(self) -> None:
        """No more frames."""

    async def flush(self, conn: Conn, within: float) -> None:
        """Wait (at most ``within`` seconds) until what ``conn`` buffered is written."""


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
    """A client connection as the fan-out sees it, whatever its socket (:class:`Sink`).

    ``offer`` never blocks and never awaits. While nothing waits and the sink can write
    without waiting (the direct WebSocket sink, below its transport's high-water mark) a frame
    is written at once; otherwise it waits in a buffer bounded in frames (``maxlen``) and in
    bytes (``max_bytes``), which the sink drains (``drain`` when the transport can take more;
    a sink that pulls — an ASGI writer task, the SSE response body — is woken). When the
    buffer is full the frame is dropped (counted); a client whose buffer is still full
    ``slow_timeout`` seconds after the first drop is disconnected with 4008 and its socket
    aborted (the sink's ``abort``): a client that never reads gets no close handshake to hold
    the socket (and what was written to it) open.

    Frames are UTF-8 JSON ``bytes``, encoded once by the caller; a fan-out also passes the
    WebSocket frame it built once (``wire``), so N clients cost N socket writes.
    """

    ends_first: ClassVar[bool] = False
    """Ended as shutdown begins, before the server waits for connections to close (an SSE
    stream: nothing else would end it)."""

    __slots__ = (
        "user",
        "verified",
        "rooms",
        "is_closed",
        "close_code",
        "task",
        "shut_cancelled",
        "_sink",
        "_framed",
        "_buf",
        "_max",
        "_bytes",
        "_max_bytes",
        "_slow_timer",
        "dms",
        "_full_since",
        "_slow_timeout",
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
        sink: Sink,
        user: str,
        verified: bool,
        maxlen: int,
        slow_timeout: float,
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
        self._sink = sink
        self._framed = sink.framed  # (read per frame: a slot of ours is the cheaper lookup)
        # Frames waiting for the sink, as it writes them (WebSocket frames or payloads).
        # (None until the first frame has to wait: most connections never need one.)
        self._buf: deque[bytes] | None = None
        self._max = maxlen
        self._bytes = 0
        self._max_bytes = max_bytes
        self._slow_timer: asyncio.TimerHandle | None = None
        self.dms = True
        """Direct messages to ``user`` reach this connection (off for unverified names)."""
        self._full_since: float | None = None
        self._slow_timeout = slow_timeout
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
        self._sink.start(self)
        self._sink.wake()

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
        sink = self._sink
        if self._framed:
            frame = wire if wire is not None else text_frame(frame)
        if not buf and self._started and sink.can_write():
            if not sink.write(frame):
                self.shut(CloseCode.GOING_AWAY)
                return False
            return True
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
        sink.wake()
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

    def drain(self) -> None:
        """The sink can take frames again (its transport went below the low-water mark):
        write what waits."""
        sink, buf = self._sink, self._buf
        if not buf:
            return
        while buf and sink.can_write():
            frame = buf.popleft()
            self._bytes -= len(frame)
            if not sink.write(frame):
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

    def waiting(self) -> bool:
        """Frames wait in the buffer."""
        return bool(self._buf)

    def next_frame(self) -> bytes | None:
        """The oldest waiting frame, taken out (a pulling sink's read); None: none waits."""
        buf = self._buf
        if not buf:
            return None
        frame = buf.popleft()
        self._bytes -= len(frame)
        return frame

    def sent(self) -> None:
        """A pulling sink wrote the frame it took."""
        if self._below_half():
            self.made_room()

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
            abort = self._sink.abort
            if abort is not None:
                abort()
        self._sink.wake()
        task = self.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            self.shut_cancelled = True
            task.cancel()

    async def stop(self) -> None:
        self._started = False
        await self._sink.stop()

    async def flush(self, within: float) -> None:
        """Wait (at most ``within`` seconds) until the buffer is written, before a close."""
        await self._sink.flush(self, within)

    async def emptied(self, within: float) -> None:
        """Wait (at most ``within`` seconds) until nothing waits in the buffer."""
        if not self._buf:
            return
        self._drained = self._drained or asyncio.Event()
        self._drained.clear()
        try:
            async with asyncio.timeout(within):
                await self._drained.wait()
        except TimeoutError:
            pass
