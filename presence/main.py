"""``roombus presence``: the presence service, with its health/metrics HTTP endpoint."""

from __future__ import annotations

from litestar import Litestar

from services.http import health_handlers, serve
from services.lifecycle import Shutdown
from services.logs import setup_logging

from .service import PresenceService
from .settings import PresenceSettings


def create_app(settings: PresenceSettings, stopping: Shutdown | None = None) -> Litestar:
    service = PresenceService(settings, stopping)
    return Litestar(
        route_handlers=health_handlers(service.ready),
        lifespan=[service.lifespan],
        openapi_config=None,
        logging_config=None,
    )


def run(settings: PresenceSettings) -> None:
    setup_logging("presence", settings.log_level)
    stopping = Shutdown(settings.shutdown_timeout)
    serve(create_app(settings, stopping), settings, stopping)
