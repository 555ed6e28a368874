"""``roombus gateway``: serve the gateway with uvicorn."""

from __future__ import annotations

import warnings

from services.http import serve
from services.logs import setup_logging

from .app import create_app
from .settings import GatewaySettings


def run(settings: GatewaySettings) -> None:
    # We pick uvicorn's "websockets" protocol on purpose (clean 1007 on bad UTF-8); its
    # deprecation notice is for the default choice, not for an explicit one.
    warnings.filterwarnings("ignore", message=".*websockets. implementation is deprecated")
    setup_logging("gateway", settings.log_level)
    serve(
        create_app(settings),
        settings,
        # uvicorn's "websockets" protocol closes invalid UTF-8 with 1007 cleanly; the default
        # sans-I/O one (uvicorn 0.54) closes too but logs a traceback per bad frame.
        ws=settings.ws_protocol,
        ws_max_size=settings.max_frame_bytes,
        # Compression costs CPU per client and invites decompression bombs.
        ws_per_message_deflate=False,
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_timeout,
    )
