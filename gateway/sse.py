"""Server-Sent Events from the bus: ``GET /sse?rooms=a,b&events=x``, ``Last-Event-ID`` replay.

A raw ASGI route, not a framework streaming response: the admission (limits counted before
any ``await``, so concurrent requests cannot all pass a per-address check), every write
(a write blocked longer than the slow-client timeout ends the stream) and the teardown are
all in one coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from litestar import Request, asgi
from litestar.handlers import ASGIRouteHandler
from litestar.types import Receive, Scope, Send

from proto.errors import CloseCode, ErrorCode
from proto.frames import FrameError
from proto.ids import is_id
from proto.names import InvalidNameError, check_event_type, check_name

from . import metrics
from .auth import AuthError, Identity
from .conn import Conn
from .edge import transport_of
from .handlers import Session

if TYPE_CHECKING:
    from .app import Gateway

KEEPALIVE = 15.0
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class SseConn(Conn):
    """A connection whose frames become SSE events (``id:`` = message id when stored).

    The same buffer (bounded in frames and bytes) and slow-client policy as WebSocket;
    :meth:`body` is the writer.
    """

    __slots__ = ()

    def offer(self, frame: bytes, msg_id: str | None = None, wire: bytes | None = None) -> bool:
        head = b"id: " + msg_id.encode() + b"\ndata: " if msg_id else b"data: "
        return super().offer(head + frame + b"\n\n")

    def start(self) -> None:
        """No writer task: :meth:`body` drains the buffer into the HTTP response."""
        self._wake = asyncio.Event()
        self._buf = deque()

    async def body(self) -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        wake = self._wake
        assert wake is not None
        while not self.is_closed:
            chunk = self.take_all()
            if not chunk:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(KEEPALIVE):
                        await wake.wait()
                if self.is_closed:
                    return
                chunk = self.take_all() or b": keepalive\n\n"
            yield chunk


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _names(raw: str | None, check: Any) -> list[str]:
    return [check(n) for n in (raw or "").split(",") if n]


def sse_handler(gw: Gateway) -> ASGIRouteHandler:
    @asgi("/sse", copy_scope=False)
    async def sse(scope: Scope, receive: Receive, send: Send) -> None:
        request: Request[Any, Any, Any] = Request(scope, receive)
        try:
            admitted = _admit(gw, request)
        except Refused as exc:
            await _respond(send, exc.status, {"code": exc.code, "message": exc.message})
            return
        # Counted in `_admit` (no await before): released whatever happens from here on.
        conn, identity, rooms, events, last, ip = admitted
        try:
            await _stream(gw, conn, identity, rooms, events, last, scope, receive, send)
        finally:
            gw.hub.remove(conn)
            metrics.SSE_STREAMS.dec()
            n = gw.per_ip.get(ip, 1) - 1
            if n > 0:
                gw.per_ip[ip] = n
            else:
                gw.per_ip.pop(ip, None)

    return sse


def _admit(
    gw: Gateway, request: Request[Any, Any, Any]
) -> tuple[SseConn, Identity, list[str], list[str], str | None, str]:
    """Every check, then the stream counted (per address, per gateway); raises Refused."""
    s = gw.settings
    if request.method != "GET":
        raise Refused(405, ErrorCode.INVALID.value, "use GET")
    if not gw.origin_allowed(request.headers.get("origin")):
        metrics.REFUSED.labels("origin").inc()
        raise Refused(403, ErrorCode.FORBIDDEN.value, "origin")
    try:
        rooms = _names(request.query_params.get("rooms"), lambda n: check_name(n, "room"))
        events = _names(request.query_params.get("events"), check_event_type)
    except InvalidNameError as exc:
        raise Refused(400, ErrorCode.BAD_NAME.value, str(exc)) from None
    if len(rooms) > s.max_rooms or len(events) > s.max_events:
        raise Refused(400, ErrorCode.TOO_MANY_ROOMS.value, "too many rooms or events")
    try:
        identity = _identity(gw, request)
    except AuthError as exc:
        status = 401 if exc.code == CloseCode.UNAUTHORIZED else 403
        raise Refused(status, str(exc.code.value), exc.reason) from None
    forbidden = [r for r in rooms if not identity.may_use(r)]
    if forbidden:
        raise Refused(403, ErrorCode.FORBIDDEN.value, f"room {forbidden[0]!r} is not yours")
    denied = [e for e in events if not identity.may_receive(e)]
    if denied:
        raise Refused(403, ErrorCode.FORBIDDEN.value, f"event {denied[0]!r} is not yours")
    last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if last and not is_id(last):
        raise Refused(400, ErrorCode.BAD_CURSOR.value, "Last-Event-ID is not a message id")
    client = request.scope.get("client")
    ip = str(client[0]) if client else "unknown"
    if len(gw.hub.conns) >= s.max_connections or gw.per_ip.get(ip, 0) >= s.max_connections_per_ip:
        metrics.REFUSED.labels("too_many_connections").inc()
        raise Refused(503, "too_many_connections", "connection limit reached")
    conn = SseConn(
        _no_send,
        identity.user,
        identity.verified,
        s.send_queue,
        s.slow_client_timeout,
        max_bytes=s.send_buffer_bytes,
    )
    conn.dms = identity.verified or s.insecure_dms
    conn.aborter = getattr(transport_of(request.scope), "abort", None)
    conn.start()
    gw.per_ip[ip] = gw.per_ip.get(ip, 0) + 1
    gw.hub.add(conn)
    metrics.SSE_STREAMS.inc()
    return conn, identity, rooms, events, last, ip


async def _respond(send: Send, status: int, body: dict[str, str]) -> None:
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def _no_send(_message: Any) -> None:  # SseConn has no ASGI writer
    return None


def _identity(gw: Gateway, request: Request[Any, Any, Any]) -> Identity:
    if gw.auth.mode == "none":
        return gw.auth.anonymous(request.query_params.get("user") or "", "guest-sse")
    token = request.query_params.get("token") or ""
    header = request.headers.get("authorization", "")
    if not token and header.lower().startswith("bearer "):
        token = header[7:].strip()
    return gw.auth.verify(token)


async def _watch_disconnect(receive: Receive, conn: Conn) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            conn.shut(CloseCode.GOING_AWAY)
            return


async def _stream(
    gw: Gateway,
    conn: SseConn,
    identity: Identity,
    rooms: list[str],
    events: list[str],
    last: str | None,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    hub = gw.hub
    session = Session(gw, conn, identity)
    expiry = None
    left = gw.auth.seconds_left(identity)
    if left is not None:
        expiry = asyncio.get_running_loop().call_later(max(0.0, left), conn.shut, 4002)
    watcher = asyncio.create_task(_watch_disconnect(receive, conn))
    replay = None
    try:
        for event in events:
            hub.subscribe(conn, event)
        for room in rooms:
            if last:
                conn.replaying[room] = []
            hub.join(conn, room)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        replay = asyncio.create_task(_replay(session, rooms, last)) if last else None
        async for chunk in conn.body():
            try:
                # uvicorn's send waits for the socket to drain: not longer than a slow
                # client may take (without this the stream would hang here forever).
                async with asyncio.timeout(gw.settings.slow_client_timeout):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except TimeoutError:
                metrics.SLOW_DISCONNECTS.inc()
                conn.shut(CloseCode.SLOW_CONSUMER)  # aborts the socket
                break
        if conn.close_code != CloseCode.SLOW_CONSUMER:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        conn.shut(conn.close_code if conn.is_closed else CloseCode.GOING_AWAY)
        if expiry is not None:
            expiry.cancel()
        for task in (watcher, replay):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


async def _replay(session: Session, rooms: list[str], last: str) -> None:
    """Every stored message after ``last`` in each room, then the live ones held meanwhile."""
    conn = session.conn
    for room in rooms:
        replayed: set[str] = set()
        try:
            await session.replay(room, last, replayed)
        except FrameError as exc:
            session.error(exc.code, exc.message, room=room)
        finally:
            held = conn.replaying.pop(room, [])
            for msg_id, frame in held:
                if msg_id not in replayed:
                    conn.offer(frame, msg_id)
