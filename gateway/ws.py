"""One WebSocket connection from upgrade to close: admission, auth, limits, read loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from litestar import WebSocket

from proto.errors import CloseCode, ErrorCode
from proto.frames import encode_frame, error_frame

from . import metrics
from .admission import Refused, Ticket
from .auth import AuthError, Identity
from .conn import Conn
from .handlers import Session
from .sinks import websocket_sink

if TYPE_CHECKING:
    from .core import Gateway

log = logging.getLogger("roombus.gateway.ws")


CREDIT_MAX = 30.0


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.stamp = float(burst), time.monotonic()

    def wait_time(self) -> float:
        """Seconds until the next token."""
        return max(0.0, (1 - self.tokens) / self.rate)

    def refill(self) -> None:
        now = time.monotonic()
        # (never below what it holds: credit may have lifted it past the burst)
        self.tokens = max(
            self.tokens, min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        )
        self.stamp = now

    def credit(self, seconds: float) -> None:
        """The server kept the client waiting ``seconds``: the frames it sent meanwhile are
        owed tokens beyond the burst (at most ``CREDIT_MAX`` seconds' worth)."""
        if seconds > 0.01:
            self.refill()
            cap = self.burst + self.rate * CREDIT_MAX
            self.tokens = min(cap, self.tokens + seconds * self.rate)

    def take(self) -> bool:
        self.refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def _client_id(text: str) -> str | None:
    """The ``client_id`` of a frame about to be dropped (parsed only then)."""
    try:
        frame = orjson.loads(text)
        cid = frame["data"]["client_id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return cid[:64] if isinstance(cid, str) else None


async def _refuse(
    socket: WebSocket[Any, Any, Any], refused: Refused, accepted: bool = False
) -> None:
    """Accept only to close with an application code the client can read (refused before the
    upgrade: close without accepting, the client gets an HTTP status)."""
    assert refused.close is not None
    with contextlib.suppress(Exception):
        if not (accepted or refused.before_upgrade):
            await socket.accept()
        await socket.close(code=refused.close, reason=refused.reason[:120])


async def serve_ws(gw: Gateway, socket: WebSocket[Any, Any, Any]) -> None:
    admission = gw.admission
    try:
        admission.check(socket.scope)
        ticket = admission.enter(socket.scope)
    except Refused as refused:
        await _refuse(socket, refused)
        return
    try:
        await _serve(gw, socket, ticket)
    finally:
        ticket.release()


async def _authenticate(gw: Gateway, socket: WebSocket[Any, Any, Any]) -> Identity:
    token = socket.query_params.get("token")
    if not token and gw.auth.mode != "none":
        # No token in the URL (it would land in access logs): the first frame must carry it.
        try:
            token = await _auth_frame(gw, socket)
        except AuthError as exc:
            raise gw.admission.unauthenticated(exc) from None
    fallback = f"guest-{id(socket) % 100000:05d}"
    return gw.admission.identify(token, socket.query_params.get("user"), fallback)


async def _auth_frame(gw: Gateway, socket: WebSocket[Any, Any, Any]) -> str:
    """The token of the first frame, ``{"type":"auth","data":{"token":...}}``."""
    try:
        async with asyncio.timeout(gw.settings.auth_timeout):
            event = await socket.receive()
    except TimeoutError:
        raise AuthError(CloseCode.UNAUTHORIZED, "no auth frame in time") from None
    text = event.get("text") if event["type"] == "websocket.receive" else None
    try:
        frame = orjson.loads(text) if isinstance(text, str) else None
    except orjson.JSONDecodeError:
        frame = None
    data = frame.get("data") if isinstance(frame, dict) and frame.get("type") == "auth" else None
    if not isinstance(data, dict) or not isinstance(data.get("token"), str):
        raise AuthError(CloseCode.UNAUTHORIZED, 'first frame must be {"type":"auth",...}')
    return str(data["token"])


async def _serve(gw: Gateway, socket: WebSocket[Any, Any, Any], ticket: Ticket) -> None:
    await socket.accept()
    try:
        identity = await _authenticate(gw, socket)
    except Refused as refused:
        await _refuse(socket, refused, accepted=True)
        return
    conn = gw.open(websocket_sink(socket.scope, socket.send), identity, Conn)
    conn.last_seen = time.monotonic()  # idle WebSockets are closed (IDLE_TIMEOUT)
    metrics.CONNECTIONS_TOTAL.inc()
    session = Session(gw, conn, identity)
    session.send(encode_frame("hello", {"user": identity.user, "verified": identity.verified}))
    ticket.expire(identity, conn.shut)
    conn.task = asyncio.current_task()
    try:
        await _read_loop(gw, socket, session)
    except asyncio.CancelledError:
        # shut() interrupts a blocked read this way; any other cancellation goes on up.
        if not conn.shut_cancelled:
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
    finally:
        conn.task = None
        gw.hub.remove(conn)
        if conn.close_code not in (CloseCode.GOING_AWAY, CloseCode.SLOW_CONSUMER):
            await conn.flush(0.5)
        await conn.stop()
        if socket.connection_state != "disconnect":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(socket.close(code=conn.close_code), 1.0)


async def _read_loop(gw: Gateway, socket: WebSocket[Any, Any, Any], session: Session) -> None:
    conn = session.conn
    s = gw.settings
    bucket = TokenBucket(s.rate_limit, s.rate_burst)
    last_rate_error = 0.0
    try:
        while True:
            # No timer per read: Hub.sweep_idle closes connections silent for too long.
            event = await socket.receive()
            conn.last_seen = time.monotonic()
            if event["type"] == "websocket.disconnect":
                return
            if not bucket.take():
                metrics.DROPPED.labels("rate_limited").inc()
                now = time.monotonic()
                text = event.get("text")
                cid = _client_id(text) if isinstance(text, str) else None
                if cid is not None:  # a dropped send is always named: the client resends it
                    session.error(
                        ErrorCode.RATE_LIMITED,
                        f"at most {s.rate_limit:g} frames/s: not sent",
                        client_id=cid,
                    )
                elif now - last_rate_error >= 1.0:  # one error a second, not one per frame
                    last_rate_error = now
                    session.error(ErrorCode.RATE_LIMITED, f"at most {s.rate_limit:g} frames/s")
                # Stop reading this socket until a token is due: a flood then waits in the
                # flooder's own buffers (TCP backpressure) instead of costing us CPU per frame.
                # Re-check after the sleep: the loop's clock (uvloop's is cached per iteration,
                # in ms) may wake us a little early, and reading then dropped the next frame
                # too, and the next: a burst of 1,000 frames was read and discarded in
                # seconds, with one error a second, while the client waited for answers.
                while True:
                    await asyncio.sleep(max(bucket.wait_time(), 0.001))
                    bucket.refill()
                    if bucket.tokens >= 1:
                        break
                continue
            text = event.get("text")
            if not isinstance(text, str):
                metrics.CLIENT_ERRORS.labels(ErrorCode.BAD_FRAME.value).inc()
                conn.offer(error_frame(ErrorCode.BAD_FRAME, "binary frames are not accepted"))
                continue
            started = time.monotonic()
            await session.handle_text(text)
            # While we were busy (a join or a query waiting on a backing service) the client's
            # frames waited in our buffers: that time is credited, so a backlog we caused is
            # never charged to the client as a burst.
            bucket.credit(time.monotonic() - started)
    finally:
        conn.shut(conn.close_code if conn.is_closed else CloseCode.GOING_AWAY)
