"""Who a connection is: a self-chosen name (auth off) or a verified JWT ``sub``."""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from proto.errors import CloseCode
from proto.names import is_name, sanitize_user

from .settings import GatewaySettings

TOKEN_MAX = 8192


@dataclass(frozen=True)
class Identity:
    user: str
    verified: bool
    rooms: tuple[str, ...] | None = None
    """Room patterns this user may use; None = every room."""
    expires: float | None = None
    """Unix time the token expires (the connection is closed then)."""
    events: tuple[str, ...] | None = None
    """Event-type patterns (``order.*``) this user may receive; None = every event type."""

    def may_use(self, room: str) -> bool:
        if self.rooms is None:
            return True
        return any(fnmatch.fnmatchcase(room, pattern) for pattern in self.rooms)

    def may_receive(self, event: str) -> bool:
        if self.events is None:
            return True
        return any(fnmatch.fnmatchcase(event, pattern) for pattern in self.events)


class AuthError(Exception):
    """Authentication failed: the connection closes with ``code``."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Authenticator:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.mode = settings.roombus_auth
        self._key: Any = None
        self._algorithms: list[str] = []
        if settings.jwt_public_key:
            pem = settings.jwt_public_key
            if not pem.lstrip().startswith("-----BEGIN") and Path(pem).is_file():
                pem = Path(pem).read_text()
            self._key, self._algorithms = pem, ["RS256"]
        elif settings.jwt_secret is not None:
            self._key, self._algorithms = settings.jwt_secret.get_secret_value(), ["HS256"]

    def anonymous(self, raw_user: str, fallback: str) -> Identity:
        return Identity(user=sanitize_user(raw_user) or fallback, verified=False)

    def verify(self, token: str) -> Identity:
        """The identity in a signed token; raises :class:`AuthError` (4001 / 4002)."""
        if not token or len(token) > TOKEN_MAX:
            raise AuthError(CloseCode.UNAUTHORIZED, "missing or oversized token")
        s = self.settings
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=s.jwt_audience,
                issuer=s.jwt_issuer,
                leeway=s.jwt_leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(CloseCode.TOKEN_EXPIRED, "token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(CloseCode.UNAUTHORIZED, f"invalid token: {exc}"[:120]) from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not is_name(sub):
            raise AuthError(CloseCode.UNAUTHORIZED, "token sub is not a valid user id")
        exp = claims.get("exp")
        # PyJWT takes "exp": "1700000000" too; the expiry timer needs a number: fail closed.
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise AuthError(CloseCode.UNAUTHORIZED, "token exp must be a number")
        return Identity(
            user=sub,
            verified=True,
            rooms=_patterns(claims, s.jwt_rooms_claim),
            expires=float(exp) + s.jwt_leeway,
            events=_patterns(claims, s.jwt_events_claim),
        )

    @staticmethod
    def seconds_left(identity: Identity) -> float | None:
        if identity.expires is None:
            return None
        return identity.expires - time.time()


def _patterns(claims: dict[str, Any], claim: str) -> tuple[str, ...] | None:
    """A list-of-patterns claim; absent: None (no restriction). Anything else but a list of
    strings (``null`` included: it must not mean "everything") refuses the token."""
    if claim not in claims:
        return None
    value = claims[claim]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise AuthError(CloseCode.UNAUTHORIZED, f"claim {claim!r} must be a list of strings")
    return tuple(value)
