"""Server-Sent Events from the bus: ``GET /sse?rooms=a,b&events=x``, ``Last-Event-ID`` replay."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from litestar import Request, Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.response import Stream

from proto.errors import CloseCode, ErrorCode
from proto.frames import SEQ_MAX, FrameError, encode_frame
from proto.names import InvalidNameError, check_event_type, check_name

from . import metrics
from .auth import AuthError, Identity
from .conn import Conn
from .handlers import Session
from .recovery import join_stored, replay

if TYPE_CHECKING:
    from .app import Gateway

KEEPALIVE = 15.0


class SseConn(Conn):
    """A connection whose frames become SSE events; a stored message's ``id:`` is the stream
    position: its ``seq`` with one room, ``room:seq,room:seq`` with several (each room's
    last delivered ``seq``), so ``Last-Event-ID`` resumes every room exactly.

    The same bounded buffer and slow-client policy as WebSocket; the response body
    generator is the writer.
    """

    __slots__ = ("positions",)
    positions: dict[str, int]

    def offer(self, frame: bytes, cursor: int | None = None, wire: bytes | None = None) -> bool:
        if cursor is None or not frame.startswith(b'{"type":"chat.message"'):
            return super().offer(b"data: " + frame + b"\n\n")  # live only, or a DM
        positions = self.positions
        if len(positions) <= 1:
            event_id = str(cursor)
        else:
            room = _room_of(frame)
            if room in positions:
                positions[room] = cursor
            event_id = ",".join(f"{r}:{p}" for r, p in positions.items())
        return super().offer(b"id: " + event_id.encode() + b"\ndata: " + frame + b"\n\n")

    def start(self) -> None:
        """No writer task: :meth:`body` drains the buffer into the HTTP response."""
        self._wake = asyncio.Event()
        self._buf = deque()

    async def body(self) -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        buf, wake = self._buf, self._wake
        assert wake is not None and buf is not None
        while not self.is_closed:
            if not buf:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(KEEPALIVE):
                        await wake.wait()
                if not buf:
                    yield b": keepalive\n\n"
                    continue
            chunk = b"".join(buf)
            buf.clear()
            self.made_room()
            yield chunk


def _room_of(frame: bytes) -> str:
    """The ``room`` of an encoded ``chat.message`` frame (only ever called for those)."""
    data = orjson.loads(frame).get("data") or {}
    return str(data.get("room", ""))


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


def sse_handler(gw: Gateway) -> HTTPRouteHandler:
    @get("/sse", include_in_schema=False)
    async def sse(request: Request[Any, Any, Any]) -> Response[Any]:
        s = gw.settings
        if not gw.origin_allowed(request.headers.get("origin")):
            metrics.REFUSED.labels("origin").inc()
            return Response(
                {"code": ErrorCode.FORBIDDEN.value, "message": "origin"}, status_code=403
            )
        try:
            rooms = _names(request.query_params.get("rooms"), lambda n: check_name(n, "room"))
            events = _names(request.query_params.get("events"), check_event_type)
        except InvalidNameError as exc:
            return Response(
                {"code": ErrorCode.BAD_NAME.value, "message": str(exc)}, status_code=400
            )
        if len(rooms) > s.max_rooms or len(events) > s.max_events:
            return _refuse(400, ErrorCode.TOO_MANY_ROOMS.value, "too many rooms or events")
        try:
            identity = _identity(gw, request)
        except AuthError as exc:
            status = 401 if exc.code == CloseCode.UNAUTHORIZED else 403
            return _refuse(status, str(exc.code.value), exc.reason)
        forbidden = [r for r in rooms if not identity.may_use(r)]
        if forbidden:
            return _refuse(403, ErrorCode.FORBIDDEN.value, f"room {forbidden[0]!r} is not yours")
        raw_last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        try:
            last = parse_last_event_id(raw_last, rooms) if raw_last else {}
        except ValueError:
            return _refuse(
                400, ErrorCode.BAD_CURSOR.value, "Last-Event-ID is not a seq or room:seq list"
            )
        client = request.scope.get("client")
        ip = str(client[0]) if client else "unknown"
        if (
            len(gw.hub.conns) >= s.max_connections
            or gw.per_ip.get(ip, 0) >= s.max_connections_per_ip
        ):
            metrics.REFUSED.labels("too_many_connections").inc()
            return _refuse(503, "too_many_connections", "connection limit reached")
        conn = SseConn(
            _no_send, identity.user, identity.verified, s.send_queue, s.slow_client_timeout
        )
        conn.positions = dict.fromkeys(rooms, 0)
        conn.start()
        return Stream(
            _stream(gw, conn, identity, rooms, events, last, ip),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return sse


def _refuse(status: int, code: str, message: str) -> Response[dict[str, str]]:
    return Response({"code": code, "message": message}, status_code=status)


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


async def _stream(
    gw: Gateway,
    conn: SseConn,
    identity: Identity,
    rooms: list[str],
    events: list[str],
    last: dict[str, int],
    ip: str,
) -> AsyncIterator[bytes]:
    hub = gw.hub
    gw.per_ip[ip] = gw.per_ip.get(ip, 0) + 1
    hub.add(conn)
    metrics.SSE_STREAMS.inc()
    session = Session(gw, conn, identity)
    expiry = None
    left = gw.auth.seconds_left(identity)
    if left is not None:
        expiry = asyncio.get_running_loop().call_later(max(0.0, left), conn.shut, 4002)
    try:
        for event in events:
            hub.subscribe(conn, event)
        joins = asyncio.create_task(_join_all(gw, session, rooms, last))
        async for chunk in conn.body():
            yield chunk
        joins.cancel()
    finally:
        if expiry is not None:
            expiry.cancel()
        hub.remove(conn)
        metrics.SSE_STREAMS.dec()
        n = gw.per_ip.get(ip, 1) - 1
        if n > 0:
            gw.per_ip[ip] = n
        else:
            gw.per_ip.pop(ip, None)


async def _join_all(gw: Gateway, session: Session, rooms: list[str], last: dict[str, int]) -> None:
    """Join each room (``joined`` frames as events), replaying from ``Last-Event-ID``."""
    conn = session.conn
    assert isinstance(conn, SseConn)
    for room in rooms:
        if gw.settings.is_ephemeral(room):
            gw.hub.join(conn, room)
            await gw.hub.subscribe_ephemeral(gw.bus.nc, room)
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
