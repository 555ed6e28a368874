"""The gateway's core: the state and services one process shares between its connections.

No transport here (no Litestar, uvicorn or socket code: ``app.py`` wires those to it), and no
NATS client of its own: :meth:`Gateway.serving` runs it over any :class:`CoreNats` and any
history streams, so the room logic, replay, acks and limits run in-process in unit tests (over
``tests.support.membus.MemBus`` and ``services.memstream.MemoryStream``) exactly as they run
over nats-server; :meth:`Gateway.run` is the real thing (connect, open the streams, report
presence, serve).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any, TypeVar

import orjson
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from proto import subjects
from proto.errors import CloseCode, ErrorCode
from proto.frames import FrameError
from proto.names import sanitize_user
from services.bus import Bus, CoreNats, connect
from services.lifecycle import Shutdown
from services.shards import present_streams
from services.streamread import StreamReader

from .admission import Admission
from .auth import Authenticator, Identity
from .budget import QueryBudget
from .conn import Conn, Sink
from .hub import Hub
from .interest import PENDING_BYTES, PENDING_MSGS, Interest
from .presence import PresenceReporter
from .publisher import Publisher
from .settings import GatewaySettings
from .shards import Shards

log = logging.getLogger("roombus.gateway")

C = TypeVar("C", bound=Conn)


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
        self.auth = Authenticator(settings)
        self.admission = Admission(settings, self.auth, lambda: len(self.hub.conns))
        self.queries = QueryBudget(settings.history_rate, settings.history_burst)
        self._nc: CoreNats | None = None
        self._shards: Shards | None = None
        self._publisher: Publisher | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Unique per process: presence keys of a restarted gateway are new keys.
        self.gateway_id = (
            sanitize_user(
                f"{settings.instance or socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
            )
            or f"gw-{os.getpid()}"
        )

    @property
    def accepting(self) -> bool:
        """False once shutdown began (new clients are refused)."""
        return self.admission.accepting

    @property
    def nc(self) -> CoreNats:
        if self._nc is None:
            raise RuntimeError("gateway is not connected to NATS yet")
        return self._nc

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

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a background task of this gateway (kept referenced until it finishes)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def open(self, sink: Sink, identity: Identity, kind: type[C]) -> C:
        """A connection of ``identity`` writing to ``sink``, with this gateway's bounds
        (``SEND_QUEUE``, ``SEND_BUFFER_BYTES``, ``SLOW_CLIENT_TIMEOUT``, ``MAX_INFLIGHT``),
        started and in the hub: every transport opens its connections here."""
        s = self.settings
        conn = kind(
            sink,
            identity.user,
            identity.verified,
            s.send_queue,
            s.slow_client_timeout,
            max_bytes=s.send_buffer_bytes,
        )
        conn.dms = identity.verified or s.insecure_dms
        conn.inflight = asyncio.Semaphore(s.max_inflight)
        conn.start()
        self.hub.add(conn)
        return conn

    def ready(self) -> tuple[bool, dict[str, Any]]:
        connected = self._nc is not None and self._nc.is_connected
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

    async def ask(
        self, subject: str, query: Mapping[str, object], what: str, within: float | None = None
    ) -> dict[str, object]:
        """Ask a backing service (history, presence); its ``error`` replies, silence and
        garbage become :class:`FrameError` (``unavailable`` or the code it named)."""
        try:
            msg = await self.nc.request(
                subject, orjson.dumps(query), timeout=within or self.settings.request_timeout
            )
        except (NoRespondersError, NatsTimeoutError, TimeoutError):
            raise FrameError(ErrorCode.UNAVAILABLE, f"the {what} service did not answer") from None
        try:
            reply = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            reply = None
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

    # -- running ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        """Connect to NATS, open the history streams, report presence, serve; on exit drain,
        each wait taking a part of what is left of the one shutdown deadline."""
        bus = await connect(self.settings, "gateway")
        shards = await self._open_shards(bus)
        reporter = PresenceReporter(
            bus, self.gateway_id, self.settings.presence_ttl, self.settings.presence_replicas
        )
        await reporter.start()
        try:
            async with self.serving(bus.nc, shards, reporter):
                bus.on_reconnect.append(self._reconnected)
                yield
        finally:
            await reporter.stop(self.stopping.left() / 3)
            await bus.drain(self.stopping.left())
            log.info("gateway stopped")

    @contextlib.asynccontextmanager
    async def serving(
        self, nc: CoreNats, shards: Shards, presence: PresenceReporter | None = None
    ) -> AsyncIterator[None]:
        """Serve over ``nc`` and ``shards`` (and report members to ``presence``, if given)."""
        self._nc = nc
        self._publisher = Publisher(nc, self.settings)
        self._shards = shards
        self.hub.nc = nc
        self.hub.start_feeds(shards.all[0].reader, shards.route)
        await shards.check(self.hub.reset_epoch)
        self.hub.presence = presence
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
            # The server already closed the connections, under the same deadline.
            self._stop_accepting()
            sweeper.cancel()
            watcher.cancel()
            self.interest.stop()
            if self._tasks:  # sends waiting for their storage ack
                await asyncio.wait(list(self._tasks), timeout=self.stopping.left() / 2)

    def _stop_accepting(self) -> None:
        """Shutdown starts: refuse new clients and end every stream that ends first (SSE: its
        client reconnects elsewhere, as WebSocket clients do on 1012), so none holds the
        shutdown."""
        self.admission.accepting = False
        for conn in [c for c in self.hub.conns if c.ends_first]:
            conn.shut(CloseCode.SERVICE_RESTART)

    async def _open_shards(self, bus: Bus) -> Shards:
        """A reader per history stream (shard) of the configured layout."""
        nc, layout = bus.nc, self.settings.layout
        readers = [StreamReader(nc, s, self.settings.request_timeout) for s in layout.streams()]
        for reader in readers:
            await reader.start()
        js = nc.jetstream(timeout=self.settings.request_timeout)
        return Shards(layout, readers, lambda: present_streams(js))

    def _reconnected(self) -> None:
        """Back on NATS: every feed reads what was stored while we were away."""
        self.hub.feeds_heal()
        self.spawn(self.shards.check(self.hub.reset_epoch), "epoch-check")
