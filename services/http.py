"""Health, readiness and Prometheus metrics over HTTP, and the uvicorn runner every service uses."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from litestar import Litestar, MediaType, Response, get
from litestar.handlers import HTTPRouteHandler
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest

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


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM after its graceful shutdown, so the process would die of
    the signal (exit -15). A drained, clean stop is a success: exit 0."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True


def serve(app: Litestar, settings: ServiceSettings, **uvicorn_options: Any) -> None:
    """Run ``app`` under uvicorn until SIGTERM/SIGINT, then shut down gracefully.

    uvicorn stops accepting connections, closes WebSockets with 1012, waits for
    handlers up to ``shutdown_timeout``, then runs the app's lifespan shutdown
    (which drains NATS). The process exits 0.
    """
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
    server = _Server(config)
    server.run()
