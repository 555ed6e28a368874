"""Health, readiness and Prometheus metrics over HTTP, and the uvicorn runner every service uses."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from litestar import Litestar, MediaType, Response, get
from litestar.handlers import HTTPRouteHandler
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest

from .lifecycle import Shutdown
from .settings import ServiceSettings

log = logging.getLogger("roombus.http")

# The *_created series double the exposition for no use on a dashboard.
disable_created_metrics()  # type: ignore[no-untyped-call]


def health_handlers(ready: Callable[[], tuple[bool, dict[str, Any]]]) -> list[HTTPRouteHandler]:
    """``/healthz`` (the process is alive), ``/readyz`` (``ready()`` says so), ``/metrics``."""

    @get("/healthz", media_type=MediaType.JSON, sync_to_thread=False, include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz", media_type=MediaType.JSON, sync_to_thread=False, include_in_schema=False)
    def readyz() -> Response[dict[str, Any]]:
        ok, detail = ready()
        return Response({"ready": ok, **detail}, status_code=200 if ok else 503)

    @get("/metrics", sync_to_thread=False, include_in_schema=False)
    def metrics() -> Response[bytes]:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return [healthz, readyz, metrics]


CONNECTIONS_SHARE = 0.5
"""Part of the shutdown deadline uvicorn may spend waiting for connections to close; the
lifespan (work in flight, the NATS drain) always has the rest."""

BACKSTOP_GRACE = 1.0
"""Seconds past the deadline after which a shutdown that is still not done ends the process
(exit 1): every phase is bounded, this is for the one that is not (a hung library call)."""


class _Server(uvicorn.Server):
    """uvicorn's server under one :class:`Shutdown` deadline.

    uvicorn re-raises SIGTERM after its graceful shutdown, so the process would die of the
    signal (exit -15): a drained, clean stop is a success, exit 0.
    """

    def __init__(self, config: uvicorn.Config, stopping: Shutdown) -> None:
        super().__init__(config)
        self.stopping = stopping
        self._backstop: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stopping.begin()  # the deadline counts from the signal
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        stopping = self.stopping
        stopping.run_hooks()  # e.g. SSE streams end before connections are waited for
        left = stopping.left()
        self._backstop = threading.Timer(left + BACKSTOP_GRACE, _overdue, (stopping.timeout,))
        self._backstop.daemon = True
        self._backstop.start()
        # uvicorn reads it now: its wait for connections takes a share, not the whole timeout.
        self.config.timeout_graceful_shutdown = left * CONNECTIONS_SHARE  # type: ignore[assignment]
        await super().shutdown(sockets)

    def cancel_backstop(self) -> None:
        if self._backstop is not None:
            self._backstop.cancel()


def _overdue(timeout: float) -> None:
    log.critical("shutdown overran its deadline: exiting", extra={"shutdown_timeout": timeout})
    os._exit(1)


def serve(
    app: Litestar,
    settings: ServiceSettings,
    stopping: Shutdown | None = None,
    **uvicorn_options: Any,
) -> None:
    """Run ``app`` under uvicorn until SIGTERM/SIGINT, then shut down within
    ``shutdown_timeout`` seconds of the signal (one deadline, ``stopping``, for every phase).

    The ``stopping`` hooks run first (the gateway ends SSE streams); uvicorn stops accepting
    connections, closes WebSockets with 1012 and waits for handlers, at most
    ``CONNECTIONS_SHARE`` of what is left; then the app's lifespan shutdown (work in flight,
    the NATS drain) takes what is left after that. The process exits 0.
    """
    stopping = stopping or Shutdown(settings.shutdown_timeout)
    options: dict[str, Any] = {
        "log_config": None,
        "access_log": False,
        "lifespan": "on",
        "loop": "uvloop",
        "http": "httptools",
        "timeout_graceful_shutdown": int(max(1, settings.shutdown_timeout)),
        **uvicorn_options,
    }
    config = uvicorn.Config(app, host=settings.host, port=settings.port, **options)
    server = _Server(config, stopping)
    try:
        server.run()
    finally:
        server.cancel_backstop()
