"""The HTTP publish API, for backends that speak HTTP but not NATS."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from litestar import Request, Response, post
from litestar.handlers import HTTPRouteHandler
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proto import subjects
from proto.bus import CLIENT_ID_MAX, TEXT_MAX
from proto.errors import ErrorCode
from proto.names import InvalidNameError, UserId, check_event_type, check_name

from . import metrics
from .publisher import NotStored, idempotency_key

if TYPE_CHECKING:
    from .core import Gateway


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RoomPost(_Body):
    user: UserId
    text: str = Field(min_length=1, max_length=TEXT_MAX)
    client_id: str | None = Field(default=None, min_length=1, max_length=CLIENT_ID_MAX)


class UserPost(_Body):
    sender: UserId = Field(default="system", alias="from")
    text: str = Field(min_length=1, max_length=TEXT_MAX)
    client_id: str | None = Field(default=None, min_length=1, max_length=CLIENT_ID_MAX)


def _error(status: int, code: ErrorCode, message: str, **extra: Any) -> Response[dict[str, Any]]:
    metrics.API_REQUESTS.labels(str(status)).inc()
    return Response({"code": code.value, "message": message, **extra}, status_code=status)


def api_handlers(gw: Gateway) -> list[HTTPRouteHandler]:
    keys = [
        k.strip().encode()
        for k in (gw.settings.api_keys.get_secret_value() if gw.settings.api_keys else "").split(
            ","
        )
        if k.strip()
    ]

    def authorized(request: Request[Any, Any, Any]) -> Response[dict[str, Any]] | None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return _error(401, ErrorCode.FORBIDDEN, "send Authorization: Bearer <API key>")
        given = header[7:].strip().encode()
        if not any(hmac.compare_digest(given, key) for key in keys):
            return _error(403, ErrorCode.FORBIDDEN, "unknown API key")
        return None

    async def body_of(request: Request[Any, Any, Any]) -> bytes | Response[dict[str, Any]]:
        raw = await request.body()
        if len(raw) > gw.settings.max_frame_bytes:
            return _error(413, ErrorCode.INVALID, f"body over {gw.settings.max_frame_bytes} bytes")
        return raw

    async def store(
        subject: str, body: dict[str, Any], sender: str, client_id: str | None
    ) -> Response[dict[str, Any]]:
        key = idempotency_key(f"api.{sender}", subject, client_id)
        try:
            ack = await gw.publisher.store(subject, orjson.dumps(body), key)
        except NotStored as exc:
            return _error(503, exc.code, exc.message)
        metrics.API_REQUESTS.labels("201").inc()
        return Response({"id": ack.id, "seq": ack.seq}, status_code=201)

    async def admit(
        request: Request[Any, Any, Any], name: str, check: Callable[[str], str]
    ) -> bytes | Response[dict[str, Any]]:
        """Key, name, then the body: the request's raw body, or the answer refusing it."""
        if (denied := authorized(request)) is not None:
            return denied
        try:
            check(name)
        except InvalidNameError as exc:
            return _error(400, ErrorCode.BAD_NAME, str(exc))
        return await body_of(request)

    @post("/api/rooms/{room:str}/messages", include_in_schema=False)
    async def room_message(request: Request[Any, Any, Any], room: str) -> Response[Any]:
        raw = await admit(request, room, lambda n: check_name(n, "room"))
        if isinstance(raw, Response):
            return raw
        try:
            body = RoomPost.model_validate_json(raw)
        except ValidationError as exc:
            return _error(400, ErrorCode.INVALID, _first(exc))
        if gw.settings.is_ephemeral(room):
            msg = await gw.publisher.ephemeral(room, body.user, body.text, body.client_id, True)
            metrics.API_REQUESTS.labels("202").inc()
            return Response({"id": msg.id}, status_code=202)
        # An API key holder vouches for the user it names: verified.
        chat = {"user": body.user, "text": body.text, "client_id": body.client_id}
        return await store(
            subjects.room_message(room), {**chat, "verified": True}, body.user, body.client_id
        )

    @post("/api/users/{user:str}/messages", include_in_schema=False)
    async def user_message(request: Request[Any, Any, Any], user: str) -> Response[Any]:
        raw = await admit(request, user, lambda n: check_name(n, "user"))
        if isinstance(raw, Response):
            return raw
        try:
            body = UserPost.model_validate_json(raw)
        except ValidationError as exc:
            return _error(400, ErrorCode.INVALID, _first(exc))
        dm = {"from": body.sender, "to": user, "text": body.text, "client_id": body.client_id}
        return await store(
            subjects.user_message(user), {**dm, "verified": True}, body.sender, body.client_id
        )

    @post("/api/events/{event:str}", include_in_schema=False)
    async def event(request: Request[Any, Any, Any], event: str) -> Response[Any]:
        raw = await admit(request, event, check_event_type)
        if isinstance(raw, Response):
            return raw
        try:
            orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error(400, ErrorCode.BAD_FRAME, "the body must be JSON")
        event_id = await gw.publisher.event(event, raw)
        metrics.API_REQUESTS.labels("202").inc()
        return Response({"id": event_id}, status_code=202)

    return [room_message, user_message, event]


def _first(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
