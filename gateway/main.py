"""``roombus gateway``: serve the gateway with uvicorn."""

from __future__ import annotations

import logging
import time
import warnings

from services.http import serve
from services.lifecycle import Shutdown
from services.logs import setup_logging

from . import metrics
from .app import create_app
from .edge import EdgeState, protocol
from .settings import GatewaySettings
from .wire import uvicorn_problem

WS_PROTOCOLS = {"direct": "gateway.wire:WireProtocol"}
"""uvicorn's ``ws`` option for each ``WS_PROTOCOL`` setting (the rest are uvicorn's names)."""

_BAD_UTF8 = "Invalid UTF-8 sequence received from client."


class ClientFaultFilter(logging.Filter):
    """uvicorn (0.54, sans-I/O protocol) closes a connection that sends invalid UTF-8 with
    1007, correctly, but logs it as an error with a traceback. It is the client's fault:
    count it, log one line (at most every 5 s), no traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._last = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != _BAD_UTF8:
            return True
        metrics.CLIENT_ERRORS.labels("invalid_utf8").inc()
        now = time.monotonic()
        if now - self._last < 5.0:
            return False
        self._last = now
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "closed a connection that sent invalid UTF-8 (1007)"
        return True


def run(settings: GatewaySettings) -> None:
    if settings.ws_protocol == "direct":
        problem = uvicorn_problem()
        if problem is not None:
            raise SystemExit(f"roombus gateway: {problem}")
    # The legacy "websockets" protocol is still selectable; its deprecation notice is noise.
    warnings.filterwarnings("ignore", message=".*websockets. implementation is deprecated")
    setup_logging("gateway", settings.log_level)
    logging.getLogger("uvicorn.error").addFilter(ClientFaultFilter())
    stopping = Shutdown(settings.shutdown_timeout)
    serve(
        create_app(settings, stopping),
        settings,
        stopping,
        ws=WS_PROTOCOLS.get(settings.ws_protocol, settings.ws_protocol),
        ws_max_size=settings.max_frame_bytes,
        # Compression costs CPU per client and invites decompression bombs.
        ws_per_message_deflate=False,
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_timeout,
        http=protocol(
            EdgeState(
                settings.handshake_timeout,
                settings.max_pending_per_ip,
                settings.forwarded_allowed_ips,
            )
        ),
        # uvicorn trusts X-Forwarded-For from 127.0.0.1 unless told otherwise: anyone on the
        # machine could then pick their address (and dodge the per-address limits).
        proxy_headers=bool(settings.forwarded_allowed_ips.strip()),
        forwarded_allow_ips=settings.forwarded_allowed_ips.strip() or "",
    )
