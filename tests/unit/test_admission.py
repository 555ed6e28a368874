"""The gateway's admission (WebSocket and SSE share it): each refusal's close code, HTTP status
and body code, the per-address count and its release, the token-expiry timer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import pytest

from gateway.admission import Admission, Refused
from gateway.auth import Authenticator, Identity
from gateway.settings import GatewaySettings
from proto.errors import CloseCode

SECRET = "s" * 32


def admission(open_now: int = 0, **settings: Any) -> Admission:
    s = GatewaySettings(**settings)
    return Admission(s, Authenticator(s), lambda: open_now)


def jwt_admission(**settings: Any) -> Admission:
    return admission(roombus_auth="jwt", jwt_secret=SECRET, **settings)


def scope(ip: str = "10.0.0.1", origin: str | None = None) -> dict[str, Any]:
    headers = [(b"origin", origin.encode())] if origin is not None else []
    return {"client": (ip, 5000), "headers": headers}


def token(sub: str = "ann", ttl: float = 600) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl)}, SECRET, "HS256")


def refusal(call: Any) -> tuple[CloseCode | None, int, str]:
    with pytest.raises(Refused) as info:
        call()
    return info.value.close, info.value.status, info.value.code


@pytest.mark.parametrize(
    ("tok", "expected"),
    [
        (None, (CloseCode.UNAUTHORIZED, 401, "4001")),
        ("", (CloseCode.UNAUTHORIZED, 401, "4001")),
        ("not-a-jwt", (CloseCode.UNAUTHORIZED, 401, "4001")),
        (jwt.encode({"sub": "x", "exp": 2**40}, "another-key" * 3, "HS256"), (4001, 401, "4001")),
        (token(ttl=-60), (CloseCode.TOKEN_EXPIRED, 403, "4002")),
    ],
    ids=["none", "empty", "garbage", "wrong-key", "expired"],
)
def test_bad_tokens_are_refused_with_their_code(
    tok: str | None, expected: tuple[int, int, str]
) -> None:
    assert refusal(lambda: jwt_admission().identify(tok, "ann", "guest")) == expected


def test_a_good_token_names_the_user_and_a_self_chosen_name_is_unverified() -> None:
    ident = jwt_admission().identify(token("bob"), "mallory", "guest")
    assert (ident.user, ident.verified) == ("bob", True)
    ident = admission().identify(None, "carol", "guest")
    assert (ident.user, ident.verified) == ("carol", False)
    assert admission().identify(None, None, "guest-1").user == "guest-1"


def test_a_cross_site_origin_is_refused_before_the_upgrade() -> None:
    door = admission(allowed_origins="example.com")
    door.check(scope(origin="https://example.com"))
    door.check(scope())  # no Origin: not a browser
    with pytest.raises(Refused) as info:
        door.check(scope(origin="https://evil.example"))
    assert (info.value.close, info.value.status, info.value.code) == (
        CloseCode.POLICY,
        403,
        "forbidden",
    )
    assert info.value.before_upgrade


def test_a_gateway_shutting_down_sends_clients_elsewhere() -> None:
    door = admission()
    door.accepting = False
    refused = refusal(lambda: door.check(scope()))
    assert refused == (CloseCode.SERVICE_RESTART, 503, "unavailable")


def test_the_per_address_limit_counts_until_released() -> None:
    door = admission(max_connections_per_ip=2)
    first, second = door.enter(scope()), door.enter(scope())
    assert refusal(lambda: door.enter(scope())) == (
        CloseCode.TOO_MANY_CONNECTIONS,
        503,
        "too_many_connections",
    )
    door.enter(scope("10.0.0.2")).release()  # another address still gets in
    first.release()
    first.release()  # idempotent: one place given back, not two
    third = door.enter(scope())
    assert refusal(lambda: door.enter(scope()))[0] == CloseCode.TOO_MANY_CONNECTIONS
    for ticket in (second, third):
        ticket.release()
    assert door.per_ip == {}


def test_a_full_gateway_refuses_with_4029() -> None:
    door = admission(open_now=5, max_connections=5)
    assert refusal(lambda: door.enter(scope()))[:2] == (CloseCode.TOO_MANY_CONNECTIONS, 503)
    assert door.per_ip == {}


async def test_the_expiry_timer_closes_with_4002_and_release_cancels_it() -> None:
    door = jwt_admission()
    closed: list[int] = []
    ticket = door.enter(scope())
    ticket.expire(Identity("ann", True, expires=time.time() + 0.05), closed.append)
    other = door.enter(scope())
    other.expire(Identity("bob", True, expires=time.time() + 0.05), closed.append)
    other.release()
    unlimited = door.enter(scope())
    unlimited.expire(Identity("carol", False), closed.append)  # no token: no timer
    deadline = time.monotonic() + 5
    while not closed:
        assert time.monotonic() < deadline, "the expiry timer never fired"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert closed == [CloseCode.TOKEN_EXPIRED]
    ticket.release()
    unlimited.release()
