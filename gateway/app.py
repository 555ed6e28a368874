"""The gateway application: ``create_app(settings)`` wires the transports (WebSocket, SSE, the
HTTP API, the page) to the gateway's core (:class:`gateway.core.Gateway`); uvicorn serves it."""

from __future__ import annotations

from importlib import resources
from typing import Any

from litestar import Litestar, MediaType, Response, WebSocket, get, websocket

from services.http import health_handlers
from services.lifecycle import Shutdown

from .api import api_handlers
from .core import Gateway
from .settings import GatewaySettings
from .sse import sse_handler
from .ws import serve_ws


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
        lifespan=[lambda _app: gw.run()],
        openapi_config=None,
        logging_config=None,
    )
    app.state.gateway = gw
    return app
