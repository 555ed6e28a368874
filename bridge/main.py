"""``roombus bridge``: the Redis bridge, with its health/metrics HTTP endpoint."""

from __future__ import annotations

from litestar import Litestar

from services.http import health_handlers, serve
from services.lifecycle import Shutdown
from services.logs import setup_logging

from .service import BridgeService
from .settings import BridgeSettings


def create_app(settings: BridgeSettings, stopping: Shutdown | None = None) -> Litestar:
    """Build the bridge's ASGI app; nothing connects until uvicorn runs its lifespan."""
    service = BridgeService(settings, stopping)
    app = Litestar(
        route_handlers=health_handlers(service.ready),
        lifespan=[service.lifespan],
        openapi_config=None,
        logging_config=None,
    )
    app.state.bridge = service
    return app


def run(settings: BridgeSettings) -> None:
    setup_logging("bridge", settings.log_level)
    stopping = Shutdown(settings.shutdown_timeout)
    serve(create_app(settings, stopping), settings, stopping)
