"""The connection under :class:`Client`: reconnects forever, rejoins with ``since``/``epoch``,
resends what was not acked."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidURI

from .backoff import Backoff
from .dispatch import Lost as _Lost
from .dispatch import Out, dispatch
from .errors import ClientClosed, RequestFailed, RoombusError, SendTimeout, Unauthorized
from .mailbox import Mailbox
from .room import Room, wait_or_closed
from .types import Ack, DirectMessage, Event

TokenProvider = Callable[[], Awaitable[str] | str]
"""Returns a fresh token (a plain or an async function)."""
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TEXT_MAX = 4000
RESTART = frozenset({1001, 1012})
"""The gateway is going away: reconnect at once, to the next URL."""


class Connection:
    """The connection machinery of :class:`roombus_client.Client` (see there)."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        user: str | None = None,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        backoff_base: float = 0.25,
        backoff_max: float = 10.0,
        open_timeout: float = 10.0,
        ping_interval: float = 10.0,
        keepalive: float = 60.0,
        request_timeout: float = 10.0,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("at least one gateway URL")
        self.user, self.token, self.token_provider = user, token, token_provider
        self.backoff = Backoff(backoff_base, backoff_max)
        self.open_timeout, self.ping_interval = open_timeout, ping_interval
        self.keepalive, self.request_timeout = keepalive, request_timeout
        self.me: str | None = None
        """The user the gateway says we are (from its ``hello``)."""
        self.verified = False
        self.url: str | None = None
        """The gateway URL of the current connection."""
        self.connects = 0
        """Connections made so far (1 + reconnects)."""
        self.resends = 0
        """Sends transmitted again (same ``client_id``) after a reconnect or a refusal."""
        self.rooms: dict[str, Room] = {}
        self._outbox: dict[str, Out] = {}
        self._events: set[str] = set()
        self._event_boxes: list[tuple[frozenset[str], Mailbox[Event]]] = []
        self._dms: Mailbox[DirectMessage] = Mailbox(1024, self.check_open)
        self._dm_seq = 0
        self._ws: ClientConnection | None = None
        self._ready = asyncio.Event()
        self._closed = asyncio.Event()
        self._fatal: RoombusError | None = None
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._req_locks: dict[str, asyncio.Lock] = {}
        self._joining: list[str] = []
        self._join_waiters: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count()
        self._prefix = os.urandom(5).hex()
        self._last_sent = 0.0
        self._run_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Connection:
        self._run_task = asyncio.create_task(self._run(), name="roombus-client")
        await wait_or_closed(self._ready, self._closed)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; pending calls raise :class:`ClientClosed`."""
        self._stop(None)
        tasks = [t for t in (self._run_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._ws is not None:
            await self._ws.close()

    def check_open(self) -> None:
        """Raise what stopped the client, if anything did."""
        if self._fatal is not None:
            raise self._fatal
        if self._closed.is_set():
            raise ClientClosed("the client was closed")

    def _stop(self, fatal: RoombusError | None) -> None:
        self._fatal = self._fatal or fatal
        self._closed.set()
        err = self._fatal or ClientClosed("the client was closed")
        futures: list[asyncio.Future[Any]] = [o.future for o in self._outbox.values()]
        for fut in [*futures, *self._join_waiters.values()]:
            if not fut.done():
                fut.set_exception(err)
        for room in self.rooms.values():
            room.wake()
        self._dms.wake()
        for _, box in self._event_boxes:
            box.wake()

    async def _run(self) -> None:
        turn = 0
        while not self._closed.is_set():
            url = self.urls[turn % len(self.urls)]
            code, reason, opened = 1006, "", 0.0
            try:
                if self.token is None and self.token_provider is not None:
                    self.token = await _call(self.token_provider)
                async with connect(
                    self._with_user(url),
                    open_timeout=self.open_timeout,
                    ping_interval=self.ping_interval,
                    ping_timeout=self.ping_interval,
                    close_timeout=2,
                    max_size=None,
                ) as ws:
                    opened = time.monotonic()
                    self._ws, self.url = ws, url
                    self.connects += 1
                    await self._session(ws)
                    code, reason = 1000, ""
            except ConnectionClosed as exc:
                if exc.rcvd is not None:
                    code, reason = exc.rcvd.code, exc.rcvd.reason
            except InvalidURI as exc:
                self._stop(RoombusError(str(exc)))
                return
            except Exception:
                pass  # refused, reset, timed out, an HTTP error: try again
            finally:
                self._lost()
            if opened and time.monotonic() - opened > 10:
                self.backoff.reset()
            if code in (4001, 4002):
                if self.token_provider is None:
                    self._stop(Unauthorized(code, reason))
                    return
                self.token = None  # a fresh one for the next attempt
                await asyncio.sleep(self.backoff.next() if code == 4001 else 0)
                continue
            turn += 1
            if code in RESTART and opened:
                continue
            await asyncio.sleep(self.backoff.next())

    def _with_user(self, url: str) -> str:
        if self.token is not None or self.user is None:
            return url
        return url + ("&" if urlsplit(url).query else "?") + urlencode({"user": self.user})

    async def _session(self, ws: ClientConnection) -> None:
        if self.token is not None:
            await ws.send(json.dumps({"type": "auth", "data": {"token": self.token}}))
        self._last_sent = time.monotonic()
        self._spawn(self._keepalive(ws))
        async for raw in ws:
            try:
                frame = json.loads(raw)
            except ValueError:
                continue
            if isinstance(frame, dict) and isinstance(frame.get("data", {}), dict):
                await dispatch(self, str(frame.get("type")), frame.get("data") or {})

    async def _keepalive(self, ws: ClientConnection) -> None:
        # The gateway closes a connection that sends nothing for IDLE_TIMEOUT (pongs do not
        # count): a reading-only client says something harmless now and then.
        while self._ws is ws:
            await asyncio.sleep(self.keepalive / 4)
            if time.monotonic() - self._last_sent > self.keepalive:
                await self.send_frame("unsubscribe", {"events": ["keepalive"]})

    def _lost(self) -> None:
        self._ws = None
        self._ready.clear()
        self._joining.clear()
        for room in self.rooms.values():
            room.disconnected()
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(_Lost())

    def _spawn(self, coro: Coroutine[Any, Any, Any], delay: float = 0.0) -> None:
        async def later() -> None:
            await asyncio.sleep(delay)
            await coro

        task = asyncio.create_task(later() if delay else coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- frames out --------------------------------------------------------------------
    async def send_frame(self, kind: str, data: dict[str, object]) -> bool:
        """Send one frame now if connected; False when it could not go out."""
        ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(json.dumps({"type": kind, "data": data}))
        except ConnectionClosed:
            return False
        self._last_sent = time.monotonic()
        return True

    async def _rejoin(self, room: Room) -> None:
        if room.left or not self._ready.is_set() or room.name in self._joining:
            return
        self._joining.append(room.name)
        room.resyncing = True
        await self.send_frame("join", room.join_data())

    async def _transmit(self, out: Out) -> None:
        if out.future.done() or not self._ready.is_set():
            return
        room = self.rooms.get(out.room) if out.room is not None else None
        if out.room is not None and (room is None or not room.is_joined.is_set()):
            return  # the (re)join sends it
        if await self.send_frame(out.kind, out.data):
            self.resends += out.sent > 0
            out.sent += 1

    async def send_stored(
        self,
        kind: str,
        data: dict[str, object],
        room: str | None,
        client_id: str | None,
        timeout: float,
    ) -> Ack:
        """Send a message that is stored (room message or DM) and wait for its ack."""
        self.check_open()
        text = data.get("text")
        if not isinstance(text, str) or not 1 <= len(text) <= TEXT_MAX:
            raise ValueError(f"text must be 1 to {TEXT_MAX} characters")
        cid = client_id or f"{self._prefix}-{next(self._ids)}"
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        out = Out(kind, {**data, "client_id": cid}, room, fut)
        self._outbox[cid] = out
        try:
            await self._transmit(out)
            return await asyncio.wait_for(out.future, timeout)
        except TimeoutError:
            raise SendTimeout(cid, timeout) from None
        finally:
            self._outbox.pop(cid, None)

    async def request(self, kind: str, data: dict[str, object]) -> dict[str, Any]:
        """A query (``history``, ``presence``, ``dm.history``); asked again after a reconnect
        or an ``unavailable`` answer, a few times."""
        async with self._req_locks.setdefault(kind, asyncio.Lock()):
            for attempt in range(6):
                await wait_or_closed(self._ready, self._closed)
                fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                self._replies[kind] = fut
                try:
                    await self.send_frame(kind, data)
                    return await asyncio.wait_for(fut, self.request_timeout)
                except (_Lost, TimeoutError):
                    continue
                except RequestFailed as exc:
                    if exc.code != "unavailable" or attempt == 5:
                        raise
                    await asyncio.sleep(0.25 * 2**attempt)
                finally:
                    self._replies.pop(kind, None)
            raise RequestFailed("unavailable", f"no answer to {kind}")


async def _call(provider: TokenProvider) -> str:
    token = provider()
    return await token if inspect.isawaitable(token) else token
