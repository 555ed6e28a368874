"""What the gateway does with each client frame."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import orjson
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from proto import frames as f
from proto import subjects
from proto.bus import ChatMessage, utcnow
from proto.errors import ErrorCode
from proto.frames import FrameError, encode_frame, error_frame
from proto.ids import new_id

from . import metrics
from .conn import Conn

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("roombus.gateway.handlers")


class Session:
    """The protocol state of one connection: its rooms, and frame dispatch."""

    def __init__(self, gw: Gateway, conn: Conn) -> None:
        self.gw = gw
        self.conn = conn

    def send(self, frame: bytes) -> None:
        self.conn.offer(frame.decode())

    def error(self, code: ErrorCode, message: str, **extra: object) -> None:
        metrics.CLIENT_ERRORS.labels(code.value).inc()
        self.send(error_frame(code, message, **extra))

    async def handle_text(self, text: str) -> None:
        try:
            frame = f.parse_client_frame(text)
        except FrameError as exc:
            metrics.FRAMES_IN.labels("invalid").inc()
            extra = {"frame": exc.frame_type} if exc.frame_type else {}
            self.error(exc.code, exc.message, **extra)
            return
        metrics.FRAMES_IN.labels(frame.type).inc()
        try:
            await self.dispatch(frame)
        except FrameError as exc:
            self.error(exc.code, exc.message, frame=frame.type)
        except Exception:
            log.exception("frame handler failed", extra={"frame": frame.type})
            self.error(ErrorCode.INTERNAL, "internal error; the frame was not processed")

    async def dispatch(self, frame: f.ClientFrame) -> None:
        match frame:
            case f.Join():
                await self.on_join(frame.data)
            case f.Leave():
                await self.on_leave(frame.data)
            case f.Chat():
                await self.on_chat(frame.data)
            case f.History():
                await self.on_history(frame.data)
            case _:
                raise FrameError(
                    ErrorCode.UNKNOWN_TYPE, f"{frame.type!r} is not served by this gateway"
                )

    # -- rooms ------------------------------------------------------------------------
    async def on_join(self, data: f.JoinData) -> None:
        conn = self.conn
        if data.room not in conn.rooms and len(conn.rooms) >= self.gw.settings.max_rooms:
            raise FrameError(
                ErrorCode.TOO_MANY_ROOMS, f"at most {self.gw.settings.max_rooms} rooms"
            )
        self.gw.hub.join(conn, data.room)
        self.send(encode_frame("joined", {"room": data.room, "user": conn.user}))

    async def on_leave(self, data: f.RoomData) -> None:
        if not self.gw.hub.leave(self.conn, data.room):
            raise FrameError(ErrorCode.NOT_JOINED, f"not in room {data.room!r}")
        self.send(encode_frame("left", {"room": data.room}))

    def require_room(self, room: str | None) -> str:
        rooms = self.conn.rooms
        if room is None:
            if len(rooms) != 1:
                raise FrameError(
                    ErrorCode.ROOM_REQUIRED,
                    "name the room: this connection is in "
                    + ("no room" if not rooms else f"{len(rooms)} rooms"),
                )
            return next(iter(rooms))
        if room not in rooms:
            raise FrameError(ErrorCode.NOT_JOINED, f"join room {room!r} first")
        return room

    # -- messages ---------------------------------------------------------------------
    async def on_chat(self, data: f.ChatData) -> None:
        room = self.require_room(data.room)
        if len(data.text) > self.gw.settings.text_max:
            raise FrameError(
                ErrorCode.TEXT_TOO_LONG, f"text is longer than {self.gw.settings.text_max}"
            )
        msg = ChatMessage(
            id=new_id(),
            room=room,
            user=self.conn.user,
            text=data.text,
            ts=utcnow(),
            client_id=data.client_id,
            verified=self.conn.verified,
        )
        await self.gw.publish_chat(msg)

    async def on_history(self, data: f.HistoryData) -> None:
        room = self.require_room(data.room)
        query = {"room": room, "before": data.before, "limit": data.limit}
        reply = await self.request(subjects.svc_history(room), query, "history")
        self.send(encode_frame("history", reply))

    async def request(
        self, subject: str, query: Mapping[str, object], what: str
    ) -> dict[str, object]:
        """Ask a backing service; its ``error`` replies become ``error`` frames."""
        try:
            msg = await self.gw.bus.nc.request(
                subject, orjson.dumps(query), timeout=self.gw.settings.request_timeout
            )
        except (NoRespondersError, NatsTimeoutError, TimeoutError):
            raise FrameError(ErrorCode.UNAVAILABLE, f"the {what} service did not answer") from None
        try:
            reply = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            raise FrameError(
                ErrorCode.UNAVAILABLE, f"the {what} service answered garbage"
            ) from None
        if not isinstance(reply, dict):
            raise FrameError(ErrorCode.UNAVAILABLE, f"the {what} service answered garbage")
        err = reply.get("error")
        if isinstance(err, dict):
            try:
                code = ErrorCode(str(err.get("code")))
            except ValueError:
                code = ErrorCode.UNAVAILABLE
            raise FrameError(code, str(err.get("message", ""))[:300])
        return reply
