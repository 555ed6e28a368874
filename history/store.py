"""The HISTORY stream: provisioning (with RePublish), storing, and reading by sequence."""

from __future__ import annotations

import asyncio

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RePublish, StorageType, StreamConfig
from nats.js.errors import NoStreamResponseError

from proto import subjects
from services.backoff import Backoff
from services.jetstream import ensure_stream

from .settings import HistorySettings


def stream_config(settings: HistorySettings) -> StreamConfig:
    """HISTORY: every stored message is republished on ``stored.<subject>`` once stored, with
    its ``Nats-Sequence`` and the previous sequence on the same subject (``Nats-Last-Sequence``):
    the one order every gateway fans out in."""
    return StreamConfig(
        name=subjects.HISTORY_STREAM,
        description="roombus chat history: history.<room> and inbox.<user> (direct messages)",
        subjects=[subjects.HISTORY_WILDCARD, subjects.INBOX_WILDCARD],
        storage=StorageType.FILE,
        num_replicas=settings.history_replicas,
        max_age=settings.history_max_age,
        max_msgs_per_subject=settings.history_max_msgs_per_room,
        max_bytes=settings.history_max_bytes,
        discard=DiscardPolicy.OLD,
        duplicate_window=settings.history_dedupe_window,
        allow_direct=True,
        republish=RePublish(src=subjects.REPUBLISH_SOURCE, dest=subjects.REPUBLISH_DEST),
    )


class Store:
    """Writes to the HISTORY stream."""

    def __init__(self, js: JetStreamContext, settings: HistorySettings) -> None:
        self.js = js
        self.settings = settings

    async def provision(self) -> None:
        await ensure_stream(self.js, stream_config(self.settings), self.settings.jetstream_wait)

    async def append(
        self,
        subject: str,
        msg_id: str | None,
        payload: bytes,
        extra: dict[str, str] | None = None,
    ) -> tuple[int, bool]:
        """Store one message (idempotent by ``msg_id``); returns (stream seq, was a duplicate).

        A duplicate's seq is the original's. While the stream has no leader (a cluster node
        died; the election takes seconds) the server answers "no responders" at once: try
        again until the store timeout, so the ack follows the election.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.history_store_timeout
        backoff = Backoff(0.1, 0.5)
        headers = {**(extra or {}), **({"Nats-Msg-Id": msg_id} if msg_id else {})} or None
        while True:
            # An awaited publish (not publish_async): JetStream's refusals (a full store, a
            # stream at its bound with discard new) arrive here as APIError, at once.
            try:
                ack = await self.js.publish(
                    subject,
                    payload,
                    timeout=max(0.01, deadline - loop.time()),
                    headers=headers,
                )
            except NoStreamResponseError:
                delay = backoff.next()
                if loop.time() + delay >= deadline:
                    raise
                await asyncio.sleep(delay)
                continue
            return ack.seq, bool(ack.duplicate)
