"""Where a connection's frames go: a :class:`~gateway.conn.Sink` per kind of socket.

:class:`~gateway.conn.Conn` holds the buffer and the slow-client policy, the same for every
client; a sink is only the way out. The default server's protocol,
:class:`~gateway.wire.WireProtocol`, is itself the sink that writes pre-built WebSocket
frames straight to the socket; :class:`AsgiSink` sends through ASGI from a writer task (any
other uvicorn WebSocket implementation); the SSE response body is the third
(``gateway.sse.SseSink``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from proto.errors import CloseCode

from .wire import from_scope

if TYPE_CHECKING:
    from .conn import Conn, Sink

Send = Callable[[Any], Awaitable[None]]


class AsgiSink:
    """``websocket.send`` through ASGI, from a writer task that runs only while frames wait
    (memory per idle connection matters)."""

    __slots__ = ("_send", "_conn", "_writer")
    framed = False
    abort = None

    def __init__(self, send: Send) -> None:
        self._send = send
        self._conn: Conn | None = None
        self._writer: asyncio.Task[None] | None = None

    def start(self, conn: Conn) -> None:
        self._conn = conn

    def can_write(self) -> bool:
        return False  # a send awaits: every frame goes through the buffer and the writer

    def write(self, data: bytes) -> bool:
        raise AssertionError("AsgiSink never writes without waiting")

    def wake(self) -> None:
        conn = self._conn
        if conn is not None and self._writer is None and conn.waiting():
            self._writer = asyncio.create_task(self._write_loop(conn))

    async def _write_loop(self, conn: Conn) -> None:
        try:
            while (frame := conn.next_frame()) is not None:
                await self._send({"type": "websocket.send", "text": frame.decode()})
                conn.sent()
        except asyncio.CancelledError:
            raise
        except Exception:
            # The socket went away under us: the read side notices and cleans up.
            conn.shut(CloseCode.GOING_AWAY)
        finally:
            self._writer = None

    async def stop(self) -> None:
        self._conn = None
        writer = self._writer
        if writer is not None:
            writer.cancel()
            try:
                await writer
            except (asyncio.CancelledError, Exception):
                pass

    async def flush(self, conn: Conn, within: float) -> None:
        writer = self._writer
        if writer is not None:
            await asyncio.wait({writer}, timeout=within)


def websocket_sink(scope: Any, send: Send) -> Sink:
    """The sink of a WebSocket: the :class:`WireProtocol` itself when the server is one."""
    wire = from_scope(scope)
    return wire if wire is not None else AsgiSink(send)
