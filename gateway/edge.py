"""The HTTP side of the gateway's sockets: limits before a request is even read.

uvicorn's httptools protocol waits forever for request headers and accepts any number of
connections from one address; only the app (after the upgrade) counts per address. So
silent or half-sent requests (slowloris) could hold every file descriptor. :func:`protocol`
builds uvicorn's protocol plus two limits:

- a connection that has not sent complete request headers within ``handshake_timeout``
  (from its accept, or from the first byte of a later request on a kept-alive connection)
  is dropped;
- at most ``max_pending_per_ip`` connections per peer address may be waiting for their
  headers at once; more from that address are dropped on accept. Proxies trusted for
  ``X-Forwarded-For`` are exempt (every client of theirs shares their address).

It also offers the transport to the app (scope ``extensions``), so a streaming response
(SSE) to a client that stopped reading can be aborted instead of waiting for a drain that
never comes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import metrics

log = logging.getLogger("roombus.gateway.edge")

TRANSPORT_KEY = "roombus.transport"
"""The key in an HTTP scope's ``extensions`` under which the connection's transport is."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Addresses:
    """A comma-separated list of addresses and networks; ``*`` matches every address."""

    def __init__(self, spec: str) -> None:
        items = [i.strip() for i in spec.split(",") if i.strip()]
        self.any = "*" in items
        self.networks: list[Network] = [
            ipaddress.ip_network(i, strict=False) for i in items if i != "*"
        ]

    def __contains__(self, host: str | None) -> bool:
        if self.any:
            return True
        if not host or not self.networks:
            return False
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in self.networks)


class EdgeState:
    """What every connection of one server shares: the limits and the per-address counts."""

    def __init__(self, handshake_timeout: float, max_pending_per_ip: int, trusted: str) -> None:
        self.handshake_timeout = handshake_timeout
        self.max_pending = max_pending_per_ip
        self.trusted = Addresses(trusted)
        self.pending: dict[str, int] = {}


class EdgeProtocol(HttpToolsProtocol):
    edge: EdgeState  # set on the subclass :func:`protocol` builds

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ip: str | None = None  # set while counted as pending
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        edge = self.edge
        ip = self.client[0] if self.client else None
        if ip is not None and ip not in edge.trusted:
            n = edge.pending.get(ip, 0)
            if n >= edge.max_pending:
                metrics.REFUSED.labels("pending_per_ip").inc()
                transport.abort()
                return
            edge.pending[ip] = n + 1
            self._ip = ip
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.edge.handshake_timeout, self._headers_too_late
            )

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        ip, self._ip = self._ip, None
        if ip is not None:
            n = self.edge.pending.get(ip, 1) - 1
            if n > 0:
                self.edge.pending[ip] = n
            else:
                self.edge.pending.pop(ip, None)

    def _headers_too_late(self) -> None:
        self._header_timer = None
        metrics.REFUSED.labels("handshake_timeout").inc()
        self._disarm()
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        # A kept-alive connection starting its next request gets the same header deadline.
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm()
        self.scope["extensions"] = {TRANSPORT_KEY: self.transport}  # type: ignore[dict-item]
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol(edge: EdgeState) -> type[EdgeProtocol]:
    """An :class:`EdgeProtocol` class bound to ``edge`` (uvicorn's ``http`` option)."""
    return type("GatewayHttpProtocol", (EdgeProtocol,), {"edge": edge})


def transport_of(scope: Any) -> Any:
    """The connection's transport, when the server is an :class:`EdgeProtocol` (uvloop's
    transports are not ``asyncio.Transport`` subclasses: check for ``abort``)."""
    transport = (scope.get("extensions") or {}).get(TRANSPORT_KEY)
    return transport if callable(getattr(transport, "abort", None)) else None
