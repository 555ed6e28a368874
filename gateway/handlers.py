"""What the gateway does with each client frame."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import orjson

from proto import frames as f
from proto import subjects
from proto.errors import ErrorCode
from proto.frames import FrameError, encode_frame, error_frame
from proto.svc import PresenceMembers

from . import metrics
from .auth import Identity
from .conn import Conn
from .publisher import NotStored, idempotency_key
from .recovery import join_stored, replay

if TYPE_CHECKING:
    from .core import Gateway

log = logging.getLogger("roombus.gateway.handlers")

INFLIGHT_WAIT = 1.0
"""Seconds (at least; twice ``ack_timeout`` when that is longer: a retry's worth) a send waits
for one of its connection's `max_inflight` slots before storage is taken as down and sends
are refused at once."""


class Session:
    """The protocol state of one connection: its rooms, and frame dispatch."""

    def __init__(self, gw: Gateway, conn: Conn, identity: Identity) -> None:
        self.gw = gw
        self.conn = conn
        self.identity = identity
        self.last_typing: dict[str, float] = {}

    def send(self, frame: bytes) -> None:
        self.conn.offer(frame)

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
        metrics.frames_in(frame.type).inc()
        try:
            await self.dispatch(frame)
        except FrameError as exc:
            # A refused send names its client_id, so the client knows which one it was.
            cid = getattr(frame.data, "client_id", None)
            extra = {"client_id": cid} if cid else {}
            self.error(exc.code, exc.message, frame=frame.type, **extra)
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
            case f.Presence():
                await self.on_presence(frame.data)
            case f.Typing():
                await self.on_typing(frame.data)
            case f.Dm():
                await self.on_dm(frame.data)
            case f.DmHistory():
                await self.on_dm_history(frame.data)
            case f.Subscribe():
                self.on_subscribe(frame.data)
            case f.Unsubscribe():
                for event in frame.data.events:
                    self.gw.hub.unsubscribe(self.conn, event)
                self.send(encode_frame("unsubscribed", {"events": sorted(self.conn.events)}))
            case f.Auth():
                raise FrameError(ErrorCode.INVALID, "already authenticated")
            case _:
                raise FrameError(
                    ErrorCode.UNKNOWN_TYPE, f"{frame.type!r} is not served by this gateway"
                )

    # -- rooms ------------------------------------------------------------------------
    async def on_join(self, data: f.JoinData) -> None:
        conn, room, gw = self.conn, data.room, self.gw
        if not self.identity.may_use(room):
            raise FrameError(ErrorCode.FORBIDDEN, f"you may not join room {room!r}")
        if room not in conn.rooms and len(conn.rooms) >= gw.settings.max_rooms:
            raise FrameError(ErrorCode.TOO_MANY_ROOMS, f"at most {gw.settings.max_rooms} rooms")
        if gw.settings.is_ephemeral(room):
            gw.hub.join(conn, room)
            await gw.hub.subscribe_ephemeral(room)
            joined = await self.joined_data(room)
            self.send(encode_frame("joined", {**joined, "ephemeral": True}))
            return
        if data.since is not None:
            self.charge_query()  # a replay reads the stream: it counts as a query
        # Presence first: from the join on, nothing may await before `joined` goes out (the
        # room's messages must not overtake it).
        joined = await self.joined_data(room)
        fields = await join_stored(gw, conn, room, data.since, data.epoch)
        self.send(encode_frame("joined", {**joined, **fields}))
        if fields.get("recovered"):
            await replay(gw, conn, room, int(str(fields["seq"])))

    async def joined_data(self, room: str) -> dict[str, object]:
        """The ``joined`` reply: the room, who we are, and who is there (when presence answers)."""
        data: dict[str, object] = {"room": room, "user": self.conn.user}
        presence = self.gw.hub.presence
        if presence is not None:  # our own report first: later joins list us
            await presence.announce(room, self.conn.user, within=0.5)
        try:
            members = await self.presence_members(room, within=0.5)
        except FrameError:
            return data  # presence is optional for joining; `presence` frames say why
        # Our own join may not have reached the presence service yet.
        everyone = sorted(set(members) | {self.conn.user})
        data.update(members=everyone, count=len(everyone))
        return data

    async def presence_members(self, room: str, within: float | None = None) -> list[str]:
        reply = await self.request(subjects.svc_presence(room), {"room": room}, "presence", within)
        members = PresenceMembers.model_validate(reply)
        return list(members.members)

    async def on_presence(self, data: f.RoomData) -> None:
        room = self.require_room(data.room)
        members = await self.presence_members(room)
        self.send(
            encode_frame("presence", {"room": room, "members": members, "count": len(members)})
        )

    async def on_typing(self, data: f.RoomData) -> None:
        room = self.require_room(data.room)
        now = time.monotonic()
        if now - self.last_typing.get(room, -1e9) < self.gw.settings.typing_interval:
            metrics.DROPPED.labels("typing_rate").inc()
            return  # typing is a hint: extra signals are coalesced, not errors
        self.last_typing[room] = now
        await self.gw.publisher.typing(room, self.conn.user)

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
    def _check_text(self, text: str) -> None:
        if len(text) > self.gw.settings.text_max:
            raise FrameError(
                ErrorCode.TEXT_TOO_LONG, f"text is longer than {self.gw.settings.text_max}"
            )

    async def on_chat(self, data: f.ChatData) -> None:
        room = self.require_room(data.room)
        self._check_text(data.text)
        conn, gw = self.conn, self.gw
        subject = subjects.room_message(room)
        if gw.settings.is_ephemeral(room):  # never stored: acked at once, no seq
            msg = await gw.publisher.ephemeral(
                room, conn.user, data.text, data.client_id, conn.verified
            )
            self.send(encode_frame("ack", {"client_id": data.client_id, "id": msg.id}))
            return
        payload = orjson.dumps(
            {
                "room": room,
                "user": conn.user,
                "text": data.text,
                "client_id": data.client_id,
                "verified": conn.verified,
            }
        )
        await self._send_stored(subject, payload, data.client_id)

    async def on_dm(self, data: f.DmData) -> None:
        self.require_dms()
        self._check_text(data.text)
        payload = orjson.dumps(
            {
                "from": self.conn.user,
                "to": data.to,
                "text": data.text,
                "client_id": data.client_id,
                "verified": self.conn.verified,
            }
        )
        await self._send_stored(subjects.user_message(data.to), payload, data.client_id)

    async def _send_stored(self, subject: str, payload: bytes, client_id: str | None) -> None:
        key = idempotency_key(self.conn.user, subject, client_id)
        # Storage acks come back asynchronously: the reader goes on with the next frame.
        # Past `max_inflight` unacked sends it waits for a slot (backpressure for a bulk
        # sender), but never long: storage that frees no slot within INFLIGHT_WAIT is taken
        # as down, and from then on (until an ack) sends are refused at once, named, so the
        # socket is read all along (pongs, presence, other rooms).
        inflight, publisher = self.conn.inflight, self.gw.publisher
        if inflight.locked():
            if publisher.storage_up:
                try:
                    wait = max(INFLIGHT_WAIT, 2 * self.gw.settings.ack_timeout)
                    async with asyncio.timeout(wait):
                        await inflight.acquire()
                except TimeoutError:
                    publisher.storage_slow()
                else:
                    self.gw.spawn(self._publish(subject, payload, key, client_id), key)
                    return
            metrics.CLIENT_ERRORS.labels("inflight_full").inc()
            raise FrameError(
                ErrorCode.UNAVAILABLE,
                f"{self.gw.settings.max_inflight} sends are waiting for storage: resend later",
            )
        await inflight.acquire()
        self.gw.spawn(self._publish(subject, payload, key, client_id), f"publish-{key}")

    def require_dms(self) -> None:
        if not self.conn.dms:  # an unverified name (ROOMBUS_AUTH=none) is anyone's to claim
            raise FrameError(ErrorCode.FORBIDDEN, "direct messages need a verified user")

    def charge_query(self) -> None:
        """One query of the user's budget (``HISTORY_RATE``), or ``rate_limited``."""
        if not self.gw.queries.take(self.conn.user):
            metrics.DROPPED.labels("query_budget").inc()
            raise FrameError(
                ErrorCode.RATE_LIMITED,
                f"at most {self.gw.settings.history_rate:g} history queries/s per user",
            )

    async def on_dm_history(self, data: f.DmHistoryData) -> None:
        """Only the user's own inbox: the query names the connection's user, nobody else."""
        self.require_dms()
        self.charge_query()
        user = self.conn.user
        query = {"user": user, "before": data.before, "after": data.after, "limit": data.limit}
        reply = await self.request(subjects.svc_inbox(user), query, "history")
        self.send(encode_frame("dm.history", reply))

    def on_subscribe(self, data: f.EventsData) -> None:
        wanted = set(data.events) - self.conn.events
        denied = sorted(e for e in wanted if not self.identity.may_receive(e))
        if denied:
            raise FrameError(ErrorCode.FORBIDDEN, f"you may not receive {denied[0]!r}")
        if len(self.conn.events) + len(wanted) > self.gw.settings.max_events:
            raise FrameError(
                ErrorCode.TOO_MANY_ROOMS, f"at most {self.gw.settings.max_events} event types"
            )
        for event in wanted:
            self.gw.hub.subscribe(self.conn, event)
        self.send(encode_frame("subscribed", {"events": sorted(self.conn.events)}))

    async def _publish(self, subject: str, payload: bytes, key: str, client_id: str | None) -> None:
        try:
            ack = await self.gw.publisher.store(subject, payload, key)
        except NotStored as exc:
            self.error(exc.code, exc.message, client_id=client_id)
            return
        except Exception:
            log.exception("publish failed", extra={"key": key})
            self.error(ErrorCode.NOT_STORED, "the message was not stored", client_id=client_id)
            return
        finally:
            self.conn.inflight.release()
        self.send(encode_frame("ack", {"client_id": client_id, "id": ack.id, "seq": ack.seq}))

    async def on_history(self, data: f.HistoryData) -> None:
        room = self.require_room(data.room)
        self.charge_query()
        query = {"room": room, "before": data.before, "limit": data.limit}
        reply = await self.request(subjects.svc_history(room), query, "history")
        self.send(encode_frame("history", reply))

    async def request(
        self, subject: str, query: Mapping[str, object], what: str, within: float | None = None
    ) -> dict[str, object]:
        """Ask a backing service; its ``error`` replies become ``error`` frames."""
        return await self.gw.ask(subject, query, what, within)
