"""Publishing client messages: an idempotency key per send, storage acks, retries with it."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time

import orjson
from nats.errors import NoRespondersError
from pydantic import ValidationError

from proto import subjects
from proto.bus import ChatMessage, PresenceEvent, utcnow
from proto.errors import ErrorCode
from proto.ids import new_id
from proto.svc import StoreAck
from services.backoff import Backoff
from services.bus import CoreNats

from . import metrics
from .settings import GatewaySettings

log = logging.getLogger("roombus.gateway.publisher")

RETRY_DELAY_MAX = 5.0
NO_RESPONDERS_GRACE = 1.0
"""Seconds a send waits for a history replica to appear (a restart) before ``unavailable``."""


class NotStored(Exception):
    """A send that could not be confirmed stored; ``code`` is what the sender is told."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _refusal(data: bytes) -> NotStored | None:
    """The history service's error reply (``{"error": {code, message}}``), if it is one."""
    if not data.startswith(b'{"error"'):
        return None
    try:
        err = orjson.loads(data)["error"]
        code = ErrorCode(str(err.get("code")))
    except (ValueError, KeyError, TypeError, AttributeError):
        code, err = ErrorCode.NOT_STORED, {}
    return NotStored(code, str(err.get("message") or "not stored")[:300])


def idempotency_key(user: str, subject: str, client_id: str | None) -> str:
    """The ``Nats-Msg-Id`` of a send: derived from (user, target, client_id), so a retry through
    any gateway is the same key; random without a client_id (only this gateway retries it)."""
    if client_id is None:
        return "g" + secrets.token_hex(16)
    digest = hashlib.sha256(f"{user}\x00{subject}\x00{client_id}".encode()).hexdigest()
    return "c" + digest[:40]


class Publisher:
    """Puts messages on the bus and waits for the history service to store them.

    The message is published on ``room.<room>.message`` (``user.<id>.message``) as a request
    with its idempotency key in ``Nats-Msg-Id``; the history replica that stored it replies
    with the stored ``id`` and ``seq`` after the JetStream PubAck. Without a reply in time the
    same bytes go out again: JetStream's duplicate window stores them once and the replica
    acks the retry with the original's ``id`` and ``seq``.
    """

    def __init__(self, nc: CoreNats, settings: GatewaySettings) -> None:
        self.nc = nc
        self.settings = settings
        self.storage_up = True
        """False since a send could not be stored (no history replica, refused, timed out),
        until the next ack: ``/readyz`` and ``roombus_gateway_storage_up`` say so."""
        metrics.STORAGE_UP.set(1)

    def storage_slow(self) -> None:
        """Sends wait on storage for too long: take it as down until the next ack."""
        self._storage(False)

    def _storage(self, up: bool) -> None:
        if up != self.storage_up:
            self.storage_up = up
            metrics.STORAGE_UP.set(1 if up else 0)
            (log.info if up else log.warning)(
                "storage is back" if up else "storage unavailable: sends are refused"
            )

    async def ephemeral(
        self, room: str, user: str, text: str, client_id: str | None, verified: bool
    ) -> ChatMessage:
        """A message to an ``EPHEMERAL_ROOMS`` room: never stored, published once, its id made
        here; the caller acks it at once (no ``seq``)."""
        msg = ChatMessage(
            id=new_id(),
            room=room,
            user=user,
            text=text,
            ts=utcnow(),
            client_id=client_id,
            verified=verified,
        )
        await self.nc.publish(
            subjects.room_message(room),
            orjson.dumps(msg.model_dump(mode="json", exclude_none=True)),
        )
        metrics.PUBLISHED.labels("ephemeral").inc()
        return msg

    async def typing(self, room: str, user: str) -> None:
        """A typing signal: live only, to everyone in the room (the sender included)."""
        event = PresenceEvent(type="typing", room=room, user=user, ts=utcnow())
        await self.nc.publish(
            subjects.room_presence(room), orjson.dumps(event.model_dump(mode="json"))
        )
        metrics.PUBLISHED.labels("typing").inc()

    async def event(self, event: str, raw: bytes) -> str:
        """An application event (``/api/events/<type>``, raw JSON): live only, never stored;
        returns the id that names this publish (its ``Nats-Msg-Id``)."""
        event_id = new_id()
        await self.nc.publish(subjects.event(event), raw, headers={"Nats-Msg-Id": event_id})
        metrics.PUBLISHED.labels("event").inc()
        return event_id

    async def store(self, subject: str, payload: bytes, key: str) -> StoreAck:
        """Publish and wait for the storage ack; raises :class:`NotStored`."""
        nc = self.nc
        headers = {"Nats-Msg-Id": key}
        deadline = time.monotonic() + self.settings.ack_deadline
        delay = self.settings.ack_timeout
        ladder = Backoff(delay * 2, RETRY_DELAY_MAX, jitter=False)  # timeouts, not sleeps
        attempt = 0
        nobody_since: float | None = None
        while True:
            attempt += 1
            (metrics.PUBLISHED_CHAT if attempt == 1 else metrics.PUBLISHED.labels("retry")).inc()
            started = time.monotonic()
            try:
                reply = await nc.request(subject, payload, timeout=delay, headers=headers)
                refused = _refusal(reply.data)
                if refused is not None:
                    self._storage(False)
                    metrics.NOT_STORED.inc()
                    raise refused
                ack = StoreAck.model_validate_json(reply.data)
                metrics.ACK_SECONDS.observe(time.monotonic() - started)
                self._storage(True)
                return ack
            except NotStored:
                raise
            except (ValidationError, ValueError):
                log.warning("unexpected storage ack", extra={"key": key})
            except asyncio.CancelledError:
                raise
            except NoRespondersError:
                # Nobody stores room messages right now: say so at once (within a second,
                # in case a replica is just restarting), not after the whole retry ladder.
                now = time.monotonic()
                nobody_since = nobody_since or now
                if now - nobody_since >= NO_RESPONDERS_GRACE:
                    self._storage(False)
                    metrics.NOT_STORED.inc()
                    raise NotStored(
                        ErrorCode.UNAVAILABLE, "no history service is running: not stored"
                    ) from None
                await asyncio.sleep(0.2)
                continue
            except Exception as exc:
                # Timeout, or the connection is down and reconnecting: the same key goes
                # out again; a timeout does not mean "not stored", so nothing is doubled.
                waited = time.monotonic() - started
                if waited < delay:
                    await asyncio.sleep(delay - waited)
                log.debug("storage ack missing", extra={"key": key, "error": repr(exc)})
            nobody_since = None
            if time.monotonic() >= deadline:
                self._storage(False)
                metrics.NOT_STORED.inc()
                raise NotStored(ErrorCode.NOT_STORED, "the message was not confirmed stored")
            delay = min(ladder.next(), max(0.05, deadline - time.monotonic()))
