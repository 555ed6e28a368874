"""Who may open a connection, WebSocket or SSE: one decision, two ways of saying no.

Both transports ask the same questions — is the gateway still taking clients, is the page's
``Origin`` allowed, who is this (a self-chosen name or a verified token), is there room for
one more connection (per gateway and per client address) — and each refusal has one code:
:class:`Refused` carries the WebSocket close code and the HTTP status and body code an SSE
client gets instead. An admitted connection holds a :class:`Ticket` (its place in the
per-address count and its token-expiry timer) until it is released.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from proto.errors import CloseCode, ErrorCode

from . import metrics
from .auth import Authenticator, AuthError, Identity
from .settings import GatewaySettings


class Refused(Exception):
    """A connection not admitted.

    ``close`` is the WebSocket close code (None: a refusal only SSE has); ``status`` and
    ``code`` the HTTP status and the ``code`` of the JSON body an SSE client gets;
    ``reason`` the close reason / the body's ``message``.
    """

    def __init__(self, status: int, code: str, reason: str, close: CloseCode | None = None):
        super().__init__(reason)
        self.status, self.code, self.reason, self.close = status, code, reason, close

    @property
    def before_upgrade(self) -> bool:
        """Refused before the WebSocket upgrade (the browser sees HTTP ``status``), not with a
        close code it could read after one: a cross-site page learns nothing more."""
        return self.close == CloseCode.POLICY


def header(scope: Any, name: bytes) -> str | None:
    """A request header (``name`` lower case), read from the raw scope: the framework's parsed
    copy of every header would stay cached on each connection for its lifetime (~1.6 KiB)."""
    for key, value in scope.get("headers") or ():
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def client_ip(scope: Any) -> str:
    """The client's address (the proxy's ``X-Forwarded-For`` when it is a trusted one)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class Ticket:
    """An admitted connection's hold on the gateway: one place in its address's count and its
    token-expiry timer. :meth:`release` gives both back (once, however often called)."""

    __slots__ = ("_counts", "ip", "_expiry")

    def __init__(self, counts: dict[str, int], ip: str) -> None:
        self._counts: dict[str, int] | None = counts
        self.ip = ip
        self._expiry: asyncio.TimerHandle | None = None

    def expire(self, identity: Identity, shut: Callable[[int], object]) -> None:
        """Call ``shut(4002)`` when ``identity``'s token expires (never without a token)."""
        left = Authenticator.seconds_left(identity)
        if left is not None:
            self._expiry = asyncio.get_running_loop().call_later(
                max(0.0, left), shut, CloseCode.TOKEN_EXPIRED
            )

    def release(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        counts, self._counts = self._counts, None
        if counts is None:
            return
        left = counts.get(self.ip, 1) - 1
        if left > 0:
            counts[self.ip] = left
        else:
            counts.pop(self.ip, None)


class Admission:
    """The gateway's door: every check a new connection passes, in the order the transports
    call them (:meth:`check` first, :meth:`identify` and :meth:`enter` in the order each
    transport needs). Each refusal is counted in ``roombus_gateway_refused_total``.

    ``open_count`` says how many connections the gateway has open now.
    """

    def __init__(
        self, settings: GatewaySettings, auth: Authenticator, open_count: Callable[[], int]
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.open_count = open_count
        self.accepting = True
        """False once shutdown began: new clients are sent to another gateway."""
        self.per_ip: dict[str, int] = {}
        """Open connections per client address (WebSocket and SSE together)."""
        origins = [o.strip().lower() for o in settings.allowed_origins.split(",") if o.strip()]
        self.any_origin = "*" in origins
        self.origin_hosts = frozenset(o.strip("[]") for o in origins)

    def origin_allowed(self, origin: str | None) -> bool:
        """No ``Origin`` (not a browser) or one whose host is in ``ALLOWED_ORIGINS``."""
        if origin is None or self.any_origin:
            return True
        try:
            host = (urlsplit(origin).hostname or "").lower()
        except ValueError:
            return False
        return host in self.origin_hosts

    def check(self, scope: Any) -> None:
        """Still taking clients, from an allowed page; raises :class:`Refused` (1012 / 503,
        or 403 before the upgrade)."""
        if not self.accepting:  # the client's retry finds another gateway
            raise _counted(
                "service_restart",
                Refused(
                    503,
                    ErrorCode.UNAVAILABLE.value,
                    "server is shutting down",
                    CloseCode.SERVICE_RESTART,
                ),
            )
        if not self.origin_allowed(header(scope, b"origin")):
            raise _counted(
                "origin", Refused(403, ErrorCode.FORBIDDEN.value, "origin", CloseCode.POLICY)
            )

    def identify(self, token: str | None, user: str | None, fallback: str) -> Identity:
        """Who the client is: with ``ROOMBUS_AUTH=none`` the name it chose (``user``, else
        ``fallback``); with ``jwt`` the verified ``token``'s subject. Raises :class:`Refused`:
        4001 / HTTP 401 (no, bad or forged token), 4002 / HTTP 403 (expired)."""
        if self.auth.mode == "none":
            return self.auth.anonymous(user or "", fallback)
        try:
            return self.auth.verify(token or "")
        except AuthError as exc:
            raise self.unauthenticated(exc) from None

    @staticmethod
    def unauthenticated(exc: AuthError) -> Refused:
        """The refusal (counted) of a client that failed to authenticate."""
        status = 401 if exc.code == CloseCode.UNAUTHORIZED else 403
        return _counted("auth", Refused(status, str(exc.code.value), exc.reason, exc.code))

    def enter(self, scope: Any) -> Ticket:
        """A place for one more connection, counted at once (no ``await`` between the check
        and the count: concurrent requests cannot all pass); raises :class:`Refused` (4029 /
        HTTP 503) when the gateway or the client's address has no room left."""
        s, ip = self.settings, client_ip(scope)
        if self.open_count() >= s.max_connections:
            reason = "gateway is full, try another"
        elif self.per_ip.get(ip, 0) >= s.max_connections_per_ip:
            reason = "too many connections from you"
        else:
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            return Ticket(self.per_ip, ip)
        raise _counted(
            "too_many_connections",
            Refused(503, "too_many_connections", reason, CloseCode.TOO_MANY_CONNECTIONS),
        )


def _counted(label: str, refused: Refused) -> Refused:
    metrics.REFUSED.labels(label).inc()
    return refused
