"""The gateway application: ``create_app(settings)`` builds it, uvicorn serves it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Coroutine
from importlib import resources
from typing import Any

from litestar import Litestar, MediaType, Response, WebSocket, get, websocket

from proto import subjects
from proto.errors import CloseCode
from proto.names import sanitize_user
from services.bus import Bus, connect
from services.http import health_handlers
from services.lifecycle import Shutdown
from services.shards import present_streams
from services.streamread import StreamReader

from .admission import Admission
from .api import api_handlers
from .auth import Authenticator
from .budget import QueryBudget
from .hub import Hub
from .interest import PENDING_BYTES, PENDING_MSGS, Interest
from .presence import PresenceReporter
from .publisher import Publisher
from .settings import GatewaySettings
from .shards import Shards
from .sse import SseConn, sse_handler
from .ws import serve_ws

log = logging.getLogger("roombus.gateway")


class Gateway:
    """Everything one gateway process shares between its connections."""

    def __init__(self, settings: GatewaySettings, stopping: Shutdown | None = None) -> None:
        self.settings = settings
        self.stopping = stopping or Shutdown(settings.shutdown_timeout)
        self.stopping.on_begin(self._stop_accepting)
        self.hub = Hub(settings.replay_buffer)
        self.hub.is_ephemeral = settings.is_ephemeral
        self.interest = Interest(
            self.hub, settings.subscribe, settings.subscribe_linger, settings.subscribe_auto_rooms
        )
        self.hub.interest = self.interest
        self._shards: Shards | None = None
        self.auth = Authenticator(settings)
        self.admission = Admission(settings, self.auth, lambda: len(self.hub.conns))
        self.queries = QueryBudget(settings.history_rate, settings.history_burst)
        self._publisher: Publisher | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Unique per process: presence keys of a restarted gateway are new keys.
        self.gateway_id = (
            sanitize_user(
                f"{settings.instance or socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
            )
            or f"gw-{os.getpid()}"
        )
        self._bus: Bus | None = None

    @property
    def accepting(self) -> bool:
        """False once shutdown began (new clients are refused)."""
        return self.admission.accepting

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError("gateway is not connected to NATS yet")
        return self._bus

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a background task of this gateway (kept referenced until it finishes)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def shards(self) -> Shards:
        """The history streams (one per shard) and where each room is read from."""
        if self._shards is None:
            raise RuntimeError("gateway is not connected to NATS yet")
        return self._shards

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            raise RuntimeError("gateway is not connected to NATS yet")
        return self._publisher

    def ready(self) -> tuple[bool, dict[str, Any]]:
        connected = self._bus is not None and self._bus.connected
        storage = self._publisher is not None and self._publisher.storage_up
        shards = self._shards
        # Streams of another HISTORY_SHARDS would be misread: not ready, and why.
        problem = shards.problem if shards is not None else None
        detail = {
            "nats": connected,
            "accepting": self.accepting,
            "history_stream": shards is not None and shards.known,
            "history_shards": self.settings.history_shards,
            "storage": storage,  # said, not failed on: every gateway has the same storage
            "subscribe": self.interest.mode,
            "room_subscriptions": len(self.interest.rooms),
            **({"history_layout": problem} if problem else {}),
        }
        return connected and self.accepting and problem is None, detail

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Litestar) -> AsyncIterator[None]:
        self._bus = await connect(self.settings, "gateway")
        nc = self._bus.nc
        self._publisher = Publisher(self._bus, self.settings)
        self._shards = shards = await self._open_shards()
        self.hub.start_feeds(shards.all[0].reader, shards.route)
        await shards.check(self.hub.reset_epoch)
        self._bus.on_reconnect.append(self._reconnected)
        reporter = PresenceReporter(
            self._bus, self.gateway_id, self.settings.presence_ttl, self.settings.presence_replicas
        )
        await reporter.start()
        self.hub.presence = reporter
        # One wildcard per channel kind, never one subscription per client; room messages and
        # presence as SUBSCRIBE says (wildcards, or one per room with local members). The
        # pending limits bound what a stalled event loop can queue up inside the client.
        await self.interest.start(nc)
        for subject, callback in (
            (subjects.STORED_INBOX_WILDCARD, self.hub.on_stored_inbox),
            (subjects.EVENT_WILDCARD, self.hub.on_event),
        ):
            await nc.subscribe(
                subject,
                cb=callback,
                pending_msgs_limit=PENDING_MSGS,
                pending_bytes_limit=PENDING_BYTES,
            )
        await nc.flush()
        sweeper = asyncio.create_task(self.hub.sweep_idle(self.settings.idle_timeout))
        watcher = asyncio.create_task(shards.watch(self.hub.reset_epoch))
        log.info(
            "gateway ready", extra={"port": self.settings.port, "subscribe": self.interest.mode}
        )
        try:
            yield
        finally:
            # Every wait takes a part of what is left of the one deadline (uvicorn already
            # closed the connections, under the same deadline).
            self._stop_accepting()
            stopping = self.stopping
            sweeper.cancel()
            watcher.cancel()
            self.interest.stop()
            if self._tasks:  # sends waiting for their storage ack
                await asyncio.wait(list(self._tasks), timeout=stopping.left() / 2)
            await reporter.stop(stopping.left() / 3)
            await self._bus.drain(stopping.left())
            log.info("gateway stopped")

    def _stop_accepting(self) -> None:
        """Shutdown starts: refuse new clients and end every SSE stream (its client reconnects
        elsewhere, as WebSocket clients do on 1012), so no open stream holds the shutdown."""
        self.admission.accepting = False
        for conn in [c for c in self.hub.conns if isinstance(c, SseConn)]:
            conn.shut(CloseCode.SERVICE_RESTART)

    # -- the streams --------------------------------------------------------------------
    async def _open_shards(self) -> Shards:
        """A reader per history stream (shard) of the configured layout."""
        nc, layout = self.bus.nc, self.settings.layout
        readers = [StreamReader(nc, s, self.settings.request_timeout) for s in layout.streams()]
        for reader in readers:
            await reader.start()
        js = nc.jetstream(timeout=self.settings.request_timeout)
        return Shards(layout, readers, lambda: present_streams(js))

    def _reconnected(self) -> None:
        """Back on NATS: every feed reads what was stored while we were away."""
        self.hub.feeds_heal()
        self.spawn(self.shards.check(self.hub.reset_epoch), "epoch-check")


def _static(name: str) -> bytes:
    # static/roombus.js is a link to clients/js/roombus.js (its source): a wheel copies it in.
    return resources.files("gateway").joinpath("static", name).read_bytes()


def create_app(settings: GatewaySettings, stopping: Shutdown | None = None) -> Litestar:
    """Build the gateway ASGI app; nothing connects until uvicorn runs its lifespan.

    ``stopping`` is the shutdown deadline the server shares with the app (:func:`serve`).
    """
    gw = Gateway(settings, stopping)
    page, module = _static("index.html"), _static("roombus.js")

    @websocket("/ws")
    async def ws(socket: WebSocket[Any, Any, Any]) -> None:
        await serve_ws(gw, socket)

    @get("/", media_type=MediaType.HTML, sync_to_thread=False, include_in_schema=False)
    def index() -> Response[bytes]:
        return Response(page, media_type=MediaType.HTML)

    @get("/roombus.js", sync_to_thread=False, include_in_schema=False)
    def roombus_js() -> Response[bytes]:
        """The browser client (an ES module): ``import { Client } from "/roombus.js"``."""
        return Response(
            module,
            media_type="text/javascript; charset=utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    app = Litestar(
        route_handlers=[
            ws,
            index,
            roombus_js,
            sse_handler(gw),
            *api_handlers(gw),
            *health_handlers(gw.ready),
        ],
        lifespan=[gw.lifespan],
        openapi_config=None,
        logging_config=None,
    )
    app.state.gateway = gw
    return app
