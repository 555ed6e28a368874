"""One NATS connection per process: reconnect forever, bounded reconnect buffer, metrics."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError, FlushTimeoutError
from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge

from .backoff import Backoff
from .jetstream import note_storage_refusal
from .settings import NatsSettings

log = logging.getLogger("roombus.bus")

NATS_CONNECTED = Gauge("roombus_nats_connected", "1 while the NATS connection is up")
NATS_RECONNECTS = Counter("roombus_nats_reconnects_total", "NATS reconnections")
NATS_ERRORS = Counter("roombus_nats_errors_total", "Errors reported by the NATS client", ["kind"])


class CoreNats(Protocol):
    """The core-NATS part of a connection that a service's logic uses: publish, request,
    subscribe, flush. The seam between that logic and the broker: nats-py's client is one
    implementation, ``tests.support.membus.MemBus`` (in-process, for unit tests) the other.
    JetStream and KV stay on :class:`Bus`."""

    @property
    def is_connected(self) -> bool: ...

    @property
    def is_closed(self) -> bool: ...

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None: ...

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 0.5,  # noqa: ASYNC109 - nats-py's signature
        old_style: bool = False,
        headers: dict[str, Any] | None = None,
    ) -> Msg: ...

    async def subscribe(
        self,
        subject: str,
        queue: str = "",
        cb: Callable[[Msg], Awaitable[None]] | None = None,
        future: asyncio.Future[Any] | None = None,
        max_msgs: int = 0,
        pending_msgs_limit: int = ...,
        pending_bytes_limit: int = ...,
    ) -> Subscription: ...

    async def flush(self, timeout: int = ...) -> None: ...  # noqa: ASYNC109


class Nats(NATS):
    """nats-py's client, with a :meth:`flush` that comes after everything sent before it.

    nats-py (2.16) writes ``flush()``'s PING straight to the socket, ahead of the commands
    still in its write buffer — a SUB or PUB made a moment ago: the PONG can come back before
    the server has them. Code here relies on that order ("once flushed, the server has the
    new subscription, and everything it sent before it is in the old one's queue": the
    ``SUBSCRIBE=auto`` switch, readiness after subscribing). So :meth:`flush` sends a message
    to a subscription of its own instead: it travels the same buffer as every earlier command,
    the server routes it after them, and it comes back after every message the server sent
    this connection before it. (Once the connection drains, nats-py's own flush: the
    subscription it comes back on is being drained too.)
    """

    def __init__(self) -> None:
        super().__init__()
        self._barrier: Subscription | None = None
        self._barriers: dict[bytes, asyncio.Future[None]] = {}
        self._barrier_n = 0
        self._draining = False

    async def drain(self) -> None:
        # nats-py's drain unsubscribes every subscription — the barrier's too — and flushes
        # as it goes (before it says it is draining): its own flush from here on.
        self._draining = True
        await super().drain()

    async def flush(self, timeout: float = 10) -> None:  # noqa: ASYNC109 - nats-py's signature
        if self.is_closed:
            raise ConnectionClosedError
        if self._draining or not self.is_connected:  # draining, reconnecting
            await super().flush(timeout)  # type: ignore[arg-type]
            return
        if self._barrier is None:
            self._barrier = await self.subscribe(self.new_inbox(), cb=self._barrier_back)
        self._barrier_n += 1
        token = str(self._barrier_n).encode()
        back = self._barriers[token] = asyncio.get_running_loop().create_future()
        try:
            await self.publish(self._barrier.subject, token)
            await asyncio.wait_for(back, timeout)
        except TimeoutError:
            raise FlushTimeoutError from None
        finally:
            self._barriers.pop(token, None)

    async def _barrier_back(self, msg: Msg) -> None:
        back = self._barriers.get(msg.data)
        if back is not None and not back.done():
            back.set_result(None)


@dataclass
class Bus:
    """The process's NATS connection and JetStream context."""

    nc: NATS
    js: JetStreamContext
    settings: NatsSettings
    on_reconnect: list[Callable[[], None]] = field(default_factory=list)
    """Called after every reconnection (e.g. to read what was missed while it was down)."""
    _closing: bool = field(default=False, repr=False)

    @property
    def connected(self) -> bool:
        """True while the connection is up (``/readyz`` reports this)."""
        return bool(self.nc.is_connected)

    async def drain(self, within: float) -> None:
        """Stop subscriptions, flush pending publishes, close; at most ``within`` seconds."""
        self._closing = True
        if self.nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.drain(), within)
        except Exception as exc:  # a drain that fails still must not block shutdown
            log.warning("nats drain did not finish cleanly", extra={"error": repr(exc)})
            if not self.nc.is_closed:
                await self.nc.close()
        NATS_CONNECTED.set(0)


async def connect(settings: NatsSettings, name: str, stop: asyncio.Event | None = None) -> Bus:
    """Connect to NATS, retrying the first connection until it works (or ``stop`` is set).

    After that the client reconnects forever on its own; publishes made while it is
    disconnected are buffered up to ``nats_reconnect_buffer`` bytes.
    """

    async def error_cb(exc: Exception) -> None:
        kind = type(exc).__name__
        NATS_ERRORS.labels(kind).inc()
        # nats-py hands the error of an async publish's ack (a full store) only to this
        # callback, its future never resolves: say why here, the publisher sees a timeout.
        if not note_storage_refusal(None, exc):
            log.warning("nats error", extra={"error": repr(exc)[:300], "kind": kind})

    async def disconnected_cb() -> None:
        NATS_CONNECTED.set(0)
        log.warning("nats disconnected")

    hooks: list[Callable[[], None]] = []

    async def reconnected_cb() -> None:
        NATS_CONNECTED.set(1)
        NATS_RECONNECTS.inc()
        log.info(
            "nats reconnected", extra={"url": str(nc.connected_url and nc.connected_url.netloc)}
        )
        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("reconnect hook failed")

    async def closed_cb() -> None:
        NATS_CONNECTED.set(0)

    attempt = 0
    backoff = Backoff(settings.nats_reconnect_wait, 2.0)
    while True:
        nc = Nats()
        try:
            await nc.connect(
                servers=settings.nats_servers,
                name=f"{name}-{os.getpid()}",
                error_cb=error_cb,
                disconnected_cb=disconnected_cb,
                reconnected_cb=reconnected_cb,
                closed_cb=closed_cb,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=settings.nats_reconnect_wait,  # type: ignore[arg-type]
                connect_timeout=settings.nats_connect_timeout,  # type: ignore[arg-type]
                pending_size=settings.nats_reconnect_buffer,
                ping_interval=10,
                max_outstanding_pings=3,
            )
            break
        except Exception as exc:
            attempt += 1
            if attempt == 1 or attempt % 20 == 0:
                log.warning(
                    "nats not reachable yet, retrying",
                    extra={"servers": settings.nats_servers, "error": repr(exc)[:200]},
                )
            if stop is not None and stop.is_set():
                raise
            await asyncio.sleep(backoff.next())
    NATS_CONNECTED.set(1)
    log.info("nats connected", extra={"url": str(nc.connected_url and nc.connected_url.netloc)})
    return Bus(nc=nc, js=nc.jetstream(), settings=settings, on_reconnect=hooks)


__all__ = ["Bus", "CoreNats", "Nats", "connect", "nats"]
