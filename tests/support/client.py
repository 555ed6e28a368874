"""A real WebSocket client for tests, with helpers that wait for conditions, not sleeps."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

Frame = dict[str, Any]


OPEN: list[Client] = []


class Client:
    """Collects every frame the gateway sends; tests wait for the ones they expect."""

    def __init__(self, ws: ClientConnection, user: str) -> None:
        self.ws = ws
        self.user = user
        self.frames: list[Frame] = []
        self._cond = asyncio.Condition()
        self._task = asyncio.create_task(self._pump())
        self.closed: ConnectionClosed | None = None
        self.hello: Frame | None = None
        self._arrivals: list[tuple[str | None, float]] = []

    @classmethod
    async def open(cls, url: str, user: str = "tester", **kw: Any) -> Client:
        sep = "&" if "?" in url else "?"
        ws = await connect(f"{url}{sep}user={user}", open_timeout=10, max_size=None, **kw)
        client = cls(ws, user)
        OPEN.append(client)
        client.hello = await client.next("hello")
        return client

    async def _pump(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                if frame["type"] == "chat.message":
                    self._arrivals.append((frame["data"].get("room"), time.perf_counter()))
                async with self._cond:
                    self.frames.append(frame)
                    self._cond.notify_all()
        except ConnectionClosed as exc:
            self.closed = exc
        finally:
            async with self._cond:
                self._cond.notify_all()

    async def send(self, kind: str, **data: Any) -> None:
        await self.ws.send(json.dumps({"type": kind, "data": data}))

    async def send_raw(self, raw: str | bytes) -> None:
        await self.ws.send(raw)

    async def wait(self, pred: Any, timeout: float = 10.0, what: str = "frame") -> list[Frame]:
        """Wait until ``pred(frames)`` is truthy; returns the frames."""
        deadline = time.monotonic() + timeout
        async with self._cond:
            while not pred(self.frames):
                left = deadline - time.monotonic()
                if left <= 0 or (self.closed is not None and self._task.done()):
                    raise AssertionError(
                        f"{self.user}: timed out waiting for {what}; {len(self.frames)} frames,"
                        f" last: {str(self.frames[-3:])[:600]} closed={self.closed!r}"
                    )
                try:
                    await asyncio.wait_for(self._cond.wait(), left)
                except TimeoutError:
                    pass
        return self.frames

    def of(self, kind: str, **match: Any) -> list[Frame]:
        return [
            f
            for f in self.frames
            if f["type"] == kind and all(f["data"].get(k) == v for k, v in match.items())
        ]

    async def next(self, kind: str, timeout: float = 10.0, **match: Any) -> Frame:
        """The first not-yet-consumed frame of ``kind`` matching ``match``."""
        await self.wait(lambda _: self.of(kind, **match), timeout, f"{kind} {match}")
        frame = self.of(kind, **match)[0]
        self.frames.remove(frame)
        return frame

    async def join(self, room: str, **extra: Any) -> Frame:
        await self.send("join", room=room, **extra)
        return await self.next("joined", room=room)

    async def error(self, code: str, timeout: float = 10.0) -> Frame:
        return await self.next("error", timeout, code=code)

    def arrived(self, room: str) -> list[float]:
        """When each ``chat.message`` of ``room`` arrived (``perf_counter``), in order."""
        return [t for r, t in self._arrivals if r == room]

    def texts(self, room: str | None = None) -> list[str]:
        return [
            f["data"]["text"]
            for f in self.frames
            if f["type"] == "chat.message" and (room is None or f["data"]["room"] == room)
        ]

    async def wait_texts(
        self, expected: list[str], room: str | None = None, timeout: float = 15.0
    ) -> None:
        """Wait until every text in ``expected`` arrived (in any order)."""
        want = set(expected)
        await self.wait(
            lambda _: want <= set(self.texts(room)), timeout, f"{len(want)} messages in {room}"
        )

    async def close(self) -> None:
        if self in OPEN:
            OPEN.remove(self)
        await self.ws.close()
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):
            pass


async def open_when_up(url: str, user: str, timeout: float = 30.0) -> Client:
    """``Client.open`` retried while nothing listens yet (a stack still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await Client.open(url, user)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def close_all() -> None:
    """Close every client a test left open (its teardown), side by side. A close the gateway
    does not answer within a second (it is still reading a flood queued before it) gives up
    on the handshake and drops the connection, instead of waiting the default 10 s."""
    clients = list(OPEN)
    for client in clients:
        client.ws.close_timeout = 1
    await asyncio.gather(*(client.close() for client in clients))
