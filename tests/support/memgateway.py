"""Gateways in-process: the real core (:class:`gateway.core.Gateway`, its hub, feeds, sessions,
publisher and limits) over :class:`MemBus` and a :class:`MemoryStream`, with the history
service's contract played by :class:`MemHistory`. A test drives a connection with the frames
a client sends and reads the frames the gateway wrote — no process, no socket, milliseconds.

The end-to-end promises are tested against real processes (tests/integration); these tests
pin the room logic, acks, retries and limits where a failure names the line at fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, cast

import orjson

from gateway.auth import Identity
from gateway.conn import Conn
from gateway.core import Gateway
from gateway.handlers import Session
from gateway.settings import GatewaySettings
from gateway.shards import Shards
from gateway.sinks import AsgiSink
from proto import subjects
from proto.bus import parse_bus_direct, stamp_bus_chat
from proto.errors import ErrorCode
from proto.shards import HistoryLayout
from proto.svc import StoreAck
from services.memstream import MemoryStream
from tests.support.membus import MemBus, MemMsg

if TYPE_CHECKING:
    from services.bus import CoreNats

WAIT = 5.0
"""Seconds a condition may take: each normally holds within a few loop iterations."""


async def soon(cond: Callable[[], object], what: str, within: float = WAIT) -> None:
    """Until ``cond()`` holds, running the loop in between (everything it waits for is a task
    of this loop); fails after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


class MemHistory:
    """The history service as the gateway relies on it: a ``room.<room>.message`` /
    ``user.<to>.message`` request is stamped (``id``, ``ts``: proto's, as the real service),
    stored in the stream, republished on ``stored.<subject>`` with ``Nats-Sequence`` /
    ``Nats-Last-Sequence``, and answered with its ``id`` and ``seq``; a resend with the same
    ``Nats-Msg-Id`` is answered with the original's (JetStream's duplicate window)."""

    def __init__(self, bus: MemBus, stream: MemoryStream) -> None:
        self.bus, self.stream = bus, stream
        self.stored: dict[str, StoreAck] = {}
        """Idempotency key -> the ack of the copy stored for it."""
        self.requests = 0
        self.lose_replies = 0
        """The next this-many stored messages get no reply (an ack lost on the way)."""
        self.refusing: tuple[ErrorCode, str] | None = None
        """Set: every request is answered with this error (a full store)."""
        self.open = asyncio.Event()
        """Cleared: requests wait before they are stored (storage frozen)."""
        self.open.set()
        self._subs: list[Any] = []

    async def start(self) -> MemHistory:
        for subject in (subjects.ROOM_MESSAGE_WILDCARD, subjects.USER_MESSAGE_WILDCARD):
            self._subs.append(await self.bus.subscribe(subject, "history", cb=self._on_request))
        return self

    async def stop(self) -> None:
        """No replica runs: requests get "no responders"."""
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()

    async def _on_request(self, msg: MemMsg) -> None:
        if not msg.reply:  # a plain publish: an ephemeral room's message (never stored)
            return
        self.requests += 1
        await self.open.wait()
        if self.refusing is not None:
            code, message = self.refusing
            await msg.respond(orjson.dumps({"error": {"code": code.value, "message": message}}))
            return
        key = (msg.headers or {}).get("Nats-Msg-Id", "")
        ack = self.stored.get(key)
        if ack is not None:
            ack = StoreAck(id=ack.id, seq=ack.seq, duplicate=True)
        else:
            ack = self.stored[key] = self._store(msg)
        if self.lose_replies > 0:
            self.lose_replies -= 1
            return
        await msg.respond(orjson.dumps(ack.model_dump()))

    def _store(self, msg: MemMsg) -> StoreAck:
        room = subjects.parse_room_message(msg.subject)
        if room is not None:
            chat = stamp_bus_chat(msg.data, room)
            payload = orjson.dumps(chat.model_dump(mode="json", exclude_none=True))
            return StoreAck(id=chat.id, seq=self.put(subjects.history(room), payload))
        to = subjects.parse_user_message(msg.subject)
        assert to is not None, msg.subject
        dm = parse_bus_direct(msg.data, to)
        payload = orjson.dumps(dm.wire())
        seqs = [self.put(subjects.inbox(u), payload) for u in dict.fromkeys([dm.sender, dm.to])]
        return StoreAck(id=dm.id, seq=seqs[-1])

    def put(self, subject: str, payload: bytes) -> int:
        """Store and republish (what the stream's RePublish does); returns the sequence."""
        p = self.stream.publish(subject, payload)
        headers = {"Nats-Sequence": str(p.seq), "Nats-Last-Sequence": str(p.prev)}
        self.bus.put(f"{subjects.STORED_PREFIX}.{subject}", payload, headers)
        return p.seq


class Client:
    """One connection to an in-memory gateway: frames in, the frames it was sent out."""

    def __init__(self, gw: Gateway, user: str, identity: Identity | None = None) -> None:
        self.frames: list[dict[str, Any]] = []
        self.gw = gw
        identity = identity or Identity(user=user, verified=True)
        self.conn: Conn = gw.open(AsgiSink(self._receive), identity, Conn)
        self.session = Session(gw, self.conn, identity)

    async def _receive(self, message: Any) -> None:
        self.frames.append(orjson.loads(message["text"]))

    async def send(self, type_: str, **data: Any) -> None:
        """A frame as the client sends it (through the same parsing as a socket's)."""
        await self.session.handle_text(orjson.dumps({"type": type_, "data": data}).decode())

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [f["data"] for f in self.frames if f["type"] == type_]

    async def next(self, type_: str, where: Callable[[dict[str, Any]], bool] = bool) -> Any:
        """The first frame of ``type_`` (that ``where`` accepts), once it came."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [d for d in self.of(type_) if where(d)]
            return bool(found)

        await soon(seen, f"a {type_!r} frame for {self.conn.user}")
        return found[0]

    async def join(self, room: str, **data: Any) -> dict[str, Any]:
        """Join; the ``joined`` frame this join was answered with."""
        before = len(self.of("joined"))
        await self.send("join", room=room, **data)
        await soon(lambda: len(self.of("joined")) > before, f"{self.conn.user} joined {room}")
        joined: dict[str, Any] = self.of("joined")[before]
        assert joined["room"] == room, joined
        return joined

    async def count(self, type_: str, n: int) -> list[dict[str, Any]]:
        """The frames of ``type_``, once there are ``n``; more than ``n`` fails."""
        await soon(lambda: len(self.of(type_)) >= n, f"{n} {type_!r} frames")
        found = self.of(type_)
        assert len(found) == n, found
        return found

    def texts(self, room: str) -> list[str]:
        return [m["text"] for m in self.of("chat.message") if m["room"] == room]


class Stack:
    """Gateways sharing one bus and one stream, and the history service's stand-in."""

    def __init__(self) -> None:
        self.bus = MemBus()
        self.stream = MemoryStream()
        self.history = MemHistory(self.bus, self.stream)
        self.gateways: list[Gateway] = []
        self._exit = contextlib.AsyncExitStack()

    async def gateway(self, **settings: Any) -> Gateway:
        """A gateway serving (``settings`` as GatewaySettings fields: ``max_inflight=2``)."""
        gw = Gateway(GatewaySettings(**settings))
        shards = Shards(HistoryLayout(1), [self.stream])
        # MemBus hands out its own message and subscription types (the gateway reads only
        # the attributes they share with nats-py's): typed as the seam, not checked as one.
        nc = cast("CoreNats", self.bus)
        await self._exit.enter_async_context(gw.serving(nc, shards))
        self.gateways.append(gw)
        return gw

    async def close(self) -> None:
        for gw in self.gateways:
            for conn in list(gw.hub.conns):
                gw.hub.remove(conn)
                await conn.stop()
        await self._exit.aclose()
        await self.bus.close()


@contextlib.asynccontextmanager
async def stack(history: bool = True) -> AsyncIterator[Stack]:
    """A :class:`Stack` with its history stand-in running (unless ``history=False``)."""
    s = Stack()
    if history:
        await s.history.start()
    try:
        yield s
    finally:
        await s.close()
