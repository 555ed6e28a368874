"""``roombus history``: the history service, with its health/metrics HTTP endpoint."""

from __future__ import annotations

from litestar import Litestar

from services.http import health_handlers, serve
from services.logs import setup_logging

from .service import HistoryService
from .settings import HistorySettings


def create_app(settings: HistorySettings) -> Litestar:
    service = HistoryService(settings)
    return Litestar(
        route_handlers=health_handlers(service.ready),
        lifespan=[service.lifespan],
        openapi_config=None,
        logging_config=None,
    )


def run(settings: HistorySettings) -> None:
    setup_logging("history", settings.log_level)
    serve(create_app(settings), settings)
