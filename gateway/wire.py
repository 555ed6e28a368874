"""The fan-out's fast path: WebSocket frames built once, written straight to the socket.

uvicorn's sans-I/O protocol turns every ``websocket.send`` into an ASGI call through the
framework, a frame built by ``websockets`` and a transport write: per client, per message.
:class:`WireProtocol` is that protocol plus two things the gateway uses for outbound frames:
``write_frame`` (a pre-built, unmasked server frame straight to the transport, no task, no
await) and a ``on_writable`` callback when the transport drains below its low-water mark.
A message fanned out to N local clients is encoded and framed once, then written N times.

Two changes to closing: ``abort`` drops a connection at once (a client that never reads is
not owed a close handshake), and a protocol error (1009 frame too big, 1007 bad UTF-8) no
longer resets the socket under a client that is still writing: the close frame is sent, our
side shut for writing, and what the client still sends is read and discarded for up to
:data:`LINGER` seconds, so it reads the close code instead of a reset.
Everything else (handshake, reads, ping/pong) is uvicorn's, unchanged.

It subclasses uvicorn's protocol and uses its attributes, which are not public API:
:func:`uvicorn_problem` checks at startup that the installed uvicorn is in the range this was
written and tested for (``UVICORN_SUPPORTED``) and still has them, so a changed uvicorn is a
clear error naming the range, not an ``AttributeError`` on the first fan-out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import uvicorn
from websockets.protocol import State

if TYPE_CHECKING:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    from .conn import Conn
else:
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import (
            WebSocketsSansIOProtocol,
        )
    except ImportError:  # reported by uvicorn_problem() when WS_PROTOCOL=direct
        WebSocketsSansIOProtocol = object

UVICORN_SUPPORTED = ((0, 54), (0, 55))
"""uvicorn versions [from, to) whose sans-I/O protocol :class:`WireProtocol` was tested on (the
pin in pyproject.toml; the contract suite in tests/integration/test_ws_protocol.py is what a
change of the pin must pass)."""

RELIES_ON: dict[str, tuple[str, ...]] = {
    # method of WebSocketsSansIOProtocol -> the attributes it sets that we read or replace
    "__init__": ("close_sent", "disconnected", "conn", "queue", "writable"),
    "connection_made": ("transport",),
    "handle_connect": ("response", "scope"),
    "connection_lost": (),
    "resume_writing": (),
    "send": (),
    "shutdown": (),
}

SINK_NAMES = ("framed", "start", "wake", "stop", "flush", "write")
"""What :class:`WireProtocol` adds to be a connection's sink: uvicorn's protocol must not have
them already (it would call ours)."""


def _range_text() -> str:
    (a, b), (c, d) = UVICORN_SUPPORTED
    return f"uvicorn>={a}.{b},<{c}.{d}"


def uvicorn_problem(version: str | None = None, base: Any = None) -> str | None:
    """Why the installed uvicorn cannot carry ``WS_PROTOCOL=direct``; None when it can."""
    version = uvicorn.__version__ if version is None else version
    base = WebSocketsSansIOProtocol if base is None else base
    fix = (
        f"WS_PROTOCOL=direct needs {_range_text()} (the version pinned in pyproject.toml): "
        "install that, or set WS_PROTOCOL=websockets-sansio"
    )
    if base is object:
        return f"uvicorn {version} has no sans-I/O WebSocket protocol; {fix}"
    try:
        key = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        key = (-1, -1)
    if not UVICORN_SUPPORTED[0] <= key < UVICORN_SUPPORTED[1]:
        return f"uvicorn {version} is outside the tested range; {fix}"
    missing = []
    for method, attrs in RELIES_ON.items():
        fn = getattr(base, method, None)
        code = getattr(fn, "__code__", None)
        if code is None:
            missing.append(f"{method}()")
            continue
        missing += [f"{method}() setting self.{a}" for a in attrs if a not in code.co_names]
    if missing:
        return f"uvicorn {version}'s protocol lacks {', '.join(missing)}; {fix}"
    taken = [name for name in SINK_NAMES if hasattr(base, name)]
    if taken:
        return f"uvicorn {version}'s protocol has its own {', '.join(taken)}; {fix}"
    return None


SCOPE_KEY = "roombus.wire"
"""The key in the ASGI scope's ``extensions`` under which the protocol offers itself."""

LINGER = 1.0
"""Seconds a connection closed for a protocol error keeps reading (and discarding)."""


class _Inbox:
    """What uvicorn needs of its receive queue (one reader), without asyncio.Queue's four
    deques (~3 KiB per idle connection)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items


class _Flag:
    """What uvicorn needs of its ``writable`` event, without a deque per connection."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for w in waiters or ():
            if not w.done():
                w.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        while not self._set:
            w = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(w)
            await w


class WireProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol with a direct, non-blocking frame writer.

    It also keeps less per idle connection: a list-backed receive queue, a plain writable
    flag, and no copy of the handshake's headers once the ASGI scope holds them.
    """

    on_writable: Callable[[], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Inbox()  # type: ignore[assignment]
        self.writable = _Flag()  # type: ignore[assignment]
        self.discarding = False
        self._out: list[bytes] | None = None
        """Frames written this loop tick, sent with one socket write when the tick ends."""

    def data_received(self, data: bytes) -> None:
        if self.discarding:  # closed for a protocol error: drain what the client still sends
            return
        super().data_received(data)

    def eof_received(self) -> None:
        if self.discarding:  # the client finished writing: nothing left to protect
            self.transport.close()

    def handle_parser_exception(self) -> None:
        """Send the close frame (1009, 1007) and linger instead of closing under the client:
        closing a socket with unread input makes the kernel send a reset, and the client's
        stack then drops our close frame before the client reads it."""
        assert self.conn.close_sent is not None
        self._flush_out()  # what was written before the error goes out before its close
        code, reason = self.conn.close_sent.code, self.conn.close_sent.reason
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.discarding = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        # A pending close timer also keeps uvicorn's run_asgi from closing the transport early.
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(LINGER, self.transport.close)

    def shutdown(self) -> None:
        self._flush_out()  # the server stops (1012): what was written goes out before the close
        super().shutdown()

    def abort(self) -> None:
        """Drop the connection now: no close handshake, unsent data discarded."""
        if self.transport is not None:
            self.transport.abort()  # also when closing: close() would wait for the buffer

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        # The request (kept alive by the handshake parser) has been copied into the scope.
        event.headers.clear()
        scope = getattr(self, "scope", None)
        if scope is not None:  # the app task is created but has not run yet
            scope["extensions"][SCOPE_KEY] = self

    async def send(self, message: Any) -> None:
        self._flush_out()  # frames written directly go out before whatever the app sends now
        await super().send(message)
        if message["type"] == "websocket.accept":
            self.response = None  # type: ignore[assignment]  # only needed to accept

    def resume_writing(self) -> None:
        super().resume_writing()
        callback = self.on_writable
        if callback is not None:
            callback()

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_writable = None
        super().connection_lost(exc)

    # -- the connection's sink (gateway.sinks.Sink): the fan-out calls these per frame, so
    # they are the protocol's own methods, not a wrapper's (a call less per frame and client)

    framed = True
    """It writes WebSocket frames: ``Conn`` frames a payload first (once per fan-out)."""

    def start(self, conn: Conn) -> None:
        self.on_writable = conn.drain

    def wake(self) -> None:
        return None  # resume_writing calls Conn.drain

    async def stop(self) -> None:
        self.on_writable = None

    async def flush(self, conn: Conn, within: float) -> None:
        await conn.emptied(within)

    def can_write(self) -> bool:
        """The transport's buffer is below its high-water mark."""
        return self.writable.is_set()

    def write_frame(self, frame: bytes) -> bool:
        """Write a pre-built frame; False once the connection is closing or gone.

        Frames written in one loop tick (a burst of stored messages, an ack and the echo of
        the sender's own message) leave in one socket write at the tick's end: one syscall
        instead of one per frame.
        """
        if self.close_sent or self.disconnected or self.conn.state is not State.OPEN:
            return False
        out = self._out
        if out is None:
            self._out = [frame]
            self.loop.call_soon(self._flush_out)
        else:
            out.append(frame)
        return True

    write = write_frame

    def _flush_out(self) -> None:
        out = self._out
        if out is None:
            return
        self._out = None
        if self.disconnected or self.transport.is_closing():
            return
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))


def from_scope(scope: Any) -> WireProtocol | None:
    """The connection's :class:`WireProtocol`, when the server is one."""
    wire = (scope.get("extensions") or {}).get(SCOPE_KEY)
    return wire if isinstance(wire, WireProtocol) else None
