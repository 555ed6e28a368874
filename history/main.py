"""``roombus history``: the history service, with its health/metrics HTTP endpoint."""

from __future__ import annotations

from litestar import Litestar

from services.http import health_handlers, serve
from services.lifecycle import Shutdown
from services.logs import setup_logging

from .service import HistoryService
from .settings import HistorySettings


def create_app(settings: HistorySettings, stopping: Shutdown | None = None) -> Litestar:
    service = HistoryService(settings, stopping)
    return Litestar(
        route_handlers=health_handlers(service.ready),
        lifespan=[service.lifespan],
        openapi_config=None,
        logging_config=None,
    )


def run(settings: HistorySettings) -> None:
    setup_logging("history", settings.log_level)
    stopping = Shutdown(settings.shutdown_timeout)
    serve(create_app(settings, stopping), settings, stopping)
