"""Server-Sent Events from the bus: ``GET /sse?rooms=a,b&events=x``, ``Last-Event-ID`` replay.

A raw ASGI route, not a framework streaming response: the admission (limits counted before
any ``await``, so concurrent requests cannot all pass a per-address check), every write
(a write blocked longer than the slow-client timeout ends the stream) and the teardown are
all in one coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import orjson
from litestar import Request, asgi
from litestar.handlers import ASGIRouteHandler
from litestar.types import Receive, Scope, Send

from proto.errors import CloseCode, ErrorCode
from proto.frames import SEQ_MAX, FrameError, encode_frame
from proto.names import InvalidNameError, check_event_type, check_name

from . import metrics
from .admission import Refused, Ticket, header
from .auth import Identity
from .conn import Conn
from .edge import transport_of
from .handlers import Session
from .recovery import join_stored, replay

if TYPE_CHECKING:
    from .core import Gateway

KEEPALIVE = 15.0
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class SseSink:
    """The HTTP response body: :meth:`body` pulls what the connection buffered, so an SSE
    client has the same buffer (bounded in frames and bytes) and slow-client policy as a
    WebSocket one."""

    __slots__ = ("abort", "_conn", "_wake")
    framed = False

    def __init__(self, abort: Callable[[], None] | None) -> None:
        self.abort = abort
        self._conn: Conn | None = None
        self._wake: asyncio.Event | None = None

    def start(self, conn: Conn) -> None:
        self._conn = conn
        self._wake = asyncio.Event()

    def can_write(self) -> bool:
        return False  # the body pulls

    def write(self, data: bytes) -> bool:
        raise AssertionError("SseSink never writes without waiting")

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def stop(self) -> None:
        return None

    async def flush(self, conn: Conn, within: float) -> None:
        return None

    async def body(self) -> AsyncIterator[bytes]:
        conn, wake = self._conn, self._wake
        assert conn is not None and wake is not None, "started first"
        yield b"retry: 2000\n\n"
        while not conn.is_closed:
            chunk = conn.take_all()
            if not chunk:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(KEEPALIVE):
                        await wake.wait()
                if conn.is_closed:
                    return
                chunk = conn.take_all() or b": keepalive\n\n"
            yield chunk


class SseConn(Conn):
    """A connection whose frames become SSE events; a stored message's ``id:`` is the stream
    position: its ``seq`` with one room, ``room:seq,room:seq`` with several (each room's
    last delivered ``seq``), so ``Last-Event-ID`` resumes every room exactly."""

    __slots__ = ("positions",)
    positions: dict[str, int]
    ends_first = True

    def offer(
        self,
        frame: bytes,
        cursor: int | None = None,
        wire: bytes | None = None,
        room: str | None = None,
    ) -> bool:
        if cursor is None or room is None:
            return super().offer(b"data: " + frame + b"\n\n")  # live only, or a DM
        positions = self.positions
        if len(positions) <= 1:
            event_id = str(cursor)
        else:
            positions[room] = cursor
            event_id = ",".join(f"{r}:{p}" for r, p in positions.items())
        return super().offer(b"id: " + event_id.encode() + b"\ndata: " + frame + b"\n\n")

    def body(self) -> AsyncIterator[bytes]:
        """The response body: what this connection buffered, as it comes."""
        sink = self._sink
        assert isinstance(sink, SseSink)
        return sink.body()


def parse_last_event_id(raw: str, rooms: list[str]) -> dict[str, int]:
    """``Last-Event-ID`` as a cursor per room: ``12`` (every room) or ``a:12,b:40``.
    Raises ValueError when it is neither."""
    if raw.isdigit():
        value = int(raw)
        if value > SEQ_MAX:
            raise ValueError("out of range")
        return dict.fromkeys(rooms, value)
    out: dict[str, int] = {}
    for part in raw.split(","):
        room, _, seq = part.partition(":")
        if room not in rooms or not seq.isdigit() or int(seq) > SEQ_MAX:
            raise ValueError("not room:seq")
        out[room] = int(seq)
    return out


def _names(raw: str | None, check: Any) -> list[str]:
    return [check(n) for n in (raw or "").split(",") if n]


def sse_handler(gw: Gateway) -> ASGIRouteHandler:
    @asgi("/sse", copy_scope=False)
    async def sse(scope: Scope, receive: Receive, send: Send) -> None:
        request: Request[Any, Any, Any] = Request(scope, receive)
        try:
            admitted = _admit(gw, request)
        except Refused as exc:
            await _respond(send, exc.status, {"code": exc.code, "message": exc.reason})
            return
        # Counted in `_admit` (no await before): released whatever happens from here on.
        conn, identity, rooms, events, last, ticket = admitted
        try:
            ticket.expire(identity, conn.shut)
            await _stream(gw, conn, identity, rooms, events, last, scope, receive, send)
        finally:
            ticket.release()
            gw.hub.remove(conn)
            metrics.SSE_STREAMS.dec()

    return sse


def _admit(
    gw: Gateway, request: Request[Any, Any, Any]
) -> tuple[SseConn, Identity, list[str], list[str], dict[str, int], Ticket]:
    """Every check, then the stream counted (per address, per gateway); raises Refused."""
    s = gw.settings
    if request.method != "GET":
        raise Refused(405, ErrorCode.INVALID.value, "use GET")
    gw.admission.check(request.scope)
    try:
        rooms = _names(request.query_params.get("rooms"), lambda n: check_name(n, "room"))
        events = _names(request.query_params.get("events"), check_event_type)
    except InvalidNameError as exc:
        raise Refused(400, ErrorCode.BAD_NAME.value, str(exc)) from None
    if len(rooms) > s.max_rooms or len(events) > s.max_events:
        raise Refused(400, ErrorCode.TOO_MANY_ROOMS.value, "too many rooms or events")
    token = request.query_params.get("token") or ""
    bearer = header(request.scope, b"authorization") or ""
    if not token and bearer.lower().startswith("bearer "):
        token = bearer[7:].strip()
    identity = gw.admission.identify(token, request.query_params.get("user"), "guest-sse")
    forbidden = [r for r in rooms if not identity.may_use(r)]
    if forbidden:
        raise Refused(403, ErrorCode.FORBIDDEN.value, f"room {forbidden[0]!r} is not yours")
    denied = [e for e in events if not identity.may_receive(e)]
    if denied:
        raise Refused(403, ErrorCode.FORBIDDEN.value, f"event {denied[0]!r} is not yours")
    raw_last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    try:
        last = parse_last_event_id(raw_last, rooms) if raw_last else {}
    except ValueError:
        raise Refused(
            400, ErrorCode.BAD_CURSOR.value, "Last-Event-ID is not a seq or room:seq list"
        ) from None
    ticket = gw.admission.enter(request.scope)
    sink = SseSink(getattr(transport_of(request.scope), "abort", None))
    conn = gw.open(sink, identity, SseConn)
    conn.positions = dict.fromkeys(rooms, 0)
    metrics.SSE_STREAMS.inc()
    return conn, identity, rooms, events, last, ticket


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
    last: dict[str, int],
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    hub = gw.hub
    session = Session(gw, conn, identity)
    watcher = asyncio.create_task(_watch_disconnect(receive, conn))
    joins = None
    try:
        for event in events:
            hub.subscribe(conn, event)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        joins = asyncio.create_task(_join_all(gw, session, rooms, last))
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
        for task in (watcher, joins):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


async def _join_all(gw: Gateway, session: Session, rooms: list[str], last: dict[str, int]) -> None:
    """Join each room (``joined`` frames as events), replaying from ``Last-Event-ID``."""
    conn = session.conn
    assert isinstance(conn, SseConn)
    for room in rooms:
        if gw.settings.is_ephemeral(room):
            gw.hub.join(conn, room)
            await gw.hub.subscribe_ephemeral(room)
            conn.offer(encode_frame("joined", {"room": room, "ephemeral": True}))
            continue
        try:
            fields = await join_stored(gw, conn, room, last.get(room), None)
        except FrameError as exc:
            session.error(exc.code, exc.message, room=room)
            continue
        conn.positions[room] = int(str(fields["seq"]))
        conn.offer(encode_frame("joined", {"room": room, "user": conn.user, **fields}))
        if fields.get("recovered"):
            await replay(gw, conn, room, int(str(fields["seq"])))
