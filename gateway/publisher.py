"""Publishing client messages: one id per client_id, storage acks, retries with the same id."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import orjson
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from proto import subjects
from proto.bus import ChatMessage, DirectMessage
from proto.ids import is_id, new_id
from proto.svc import StoreAck
from services.bus import Bus
from services.jetstream import ensure_kv

from . import metrics
from .settings import GatewaySettings

log = logging.getLogger("roombus.gateway.publisher")

RETRY_DELAY_MAX = 5.0


class Publisher:
    """Puts client messages on the bus and waits for the history service to store them.

    The message is published on ``room.<room>.message`` as a request: every gateway fans
    it out, and the history replica that stored it replies after the JetStream PubAck.
    Without a reply in time the same message (same id) is published again: gateways
    drop the second copy, JetStream's duplicate window stores it once.
    """

    def __init__(self, bus: Bus, settings: GatewaySettings) -> None:
        self.bus = bus
        self.settings = settings
        self.kv: KeyValue | None = None

    async def start(self) -> None:
        # A short per-request timeout: a lookup stuck on a dead node's connection is retried
        # after 1 s (message_id's loop) instead of the default 5 s.
        self.kv = await ensure_kv(
            self.bus.nc.jetstream(timeout=1.0),
            KeyValueConfig(
                bucket=subjects.CLIENT_IDS_BUCKET,
                description="client_id -> message id, so a retried send keeps its id",
                ttl=self.settings.client_id_ttl,
                history=1,
                storage=StorageType.FILE,
                replicas=self.settings.client_id_replicas,
            ),
            self.settings.jetstream_wait,
        )

    async def message_id(self, user: str, client_id: str | None) -> str:
        """The id for a send: new, or the one an earlier send with this client_id got."""
        fresh = new_id()
        if client_id is None or self.kv is None:
            return fresh
        key = hashlib.sha256(f"{user}\x00{client_id}".encode()).hexdigest()[:40]
        # The bucket can be briefly unavailable (broker restart, a cluster electing a new
        # leader): wait it out rather than reject the send; past half the ack deadline, go
        # on with a fresh id (the send works, only a resend elsewhere could then double it).
        deadline = time.monotonic() + self.settings.ack_deadline / 2
        delay = 0.05
        while True:
            try:
                return await self._claim(key, fresh)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() >= deadline:
                    metrics.CLIENT_ID_UNAVAILABLE.inc()
                    log.warning("client_id bucket unavailable", extra={"error": repr(exc)[:200]})
                    return fresh
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _claim(self, key: str, fresh: str) -> str:
        assert self.kv is not None
        try:
            await self.kv.create(key, fresh.encode())
            return fresh
        except KeyWrongLastSequenceError:
            entry = await self.kv.get(key)
            earlier = (entry.value or b"").decode()
            if is_id(earlier):
                metrics.CLIENT_ID_REUSED.inc()
                return earlier
            return fresh

    async def publish(self, msg: ChatMessage | DirectMessage) -> bool:
        """Publish ``msg``; True once stored (always True with ``store_acks`` off)."""
        if isinstance(msg, ChatMessage):
            payload = orjson.dumps(msg.model_dump(mode="json", exclude_none=True))
            subject = subjects.room_message(msg.room)
        else:
            payload = orjson.dumps(msg.wire())
            subject = subjects.user_message(msg.to)
        headers = {"Nats-Msg-Id": msg.id}
        nc = self.bus.nc
        if not self.settings.store_acks:
            await nc.publish(subject, payload, headers=headers)
            metrics.PUBLISHED_CHAT.inc()
            return True
        deadline = time.monotonic() + self.settings.ack_deadline
        delay = self.settings.ack_timeout
        attempt = 0
        while True:
            attempt += 1
            (metrics.PUBLISHED_CHAT if attempt == 1 else metrics.PUBLISHED.labels("retry")).inc()
            started = time.monotonic()
            try:
                reply = await nc.request(subject, payload, timeout=delay, headers=headers)
                ack = StoreAck.model_validate_json(reply.data)
                if ack.id == msg.id:
                    metrics.ACK_SECONDS.observe(time.monotonic() - started)
                    return True
            except (ValidationError, ValueError):
                log.warning("unexpected storage ack", extra={"id": msg.id})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Timeout, or the connection is down and reconnecting: the same id goes
                # out again; a timeout does not mean "not stored", so nothing is doubled.
                waited = time.monotonic() - started
                if waited < delay:
                    await asyncio.sleep(delay - waited)
                log.debug("storage ack missing", extra={"id": msg.id, "error": repr(exc)})
            if time.monotonic() >= deadline:
                metrics.NOT_STORED.inc()
                return False
            delay = min(delay * 2, RETRY_DELAY_MAX, max(0.05, deadline - time.monotonic()))
