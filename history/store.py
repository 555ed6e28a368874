"""The HISTORY stream: provisioning, storing, and reading pages forwards and backwards."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta
from typing import TypeVar

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NoStreamResponseError, NotFoundError

from proto import subjects
from proto.bus import ChatMessage, DirectMessage, utcnow
from proto.ids import id_time
from services.jetstream import ensure_stream

from .settings import HistorySettings

log = logging.getLogger("roombus.history.store")

FETCH_BATCH = 256
M = TypeVar("M", ChatMessage, DirectMessage)
WINDOW_START = timedelta(seconds=2)


def stream_config(settings: HistorySettings) -> StreamConfig:
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
    )


class Store:
    """Reads and writes of the HISTORY stream."""

    def __init__(self, js: JetStreamContext, settings: HistorySettings) -> None:
        self.js = js
        self.settings = settings

    async def provision(self) -> None:
        await ensure_stream(self.js, stream_config(self.settings), self.settings.jetstream_wait)

    async def append(self, subject: str, msg_id: str, payload: bytes) -> tuple[int, bool]:
        """Store one message (idempotent by ``msg_id``); returns (stream seq, was a duplicate).

        While the stream has no leader (a cluster node died; the election takes seconds) the
        server answers "no responders" at once: try again until the store timeout, so the
        sender's ack follows the election instead of waiting for the sender's next resend.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.history_store_timeout
        delay = 0.1
        while True:
            fut = await self.js.publish_async(
                subject,
                payload,
                headers={"Nats-Msg-Id": msg_id},
                wait_stall=self.settings.history_store_timeout,
            )
            try:
                ack = await asyncio.wait_for(fut, max(0.01, deadline - loop.time()))
            except NoStreamResponseError:
                if loop.time() + delay >= deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            return ack.seq, bool(ack.duplicate)

    # -- reading ----------------------------------------------------------------------
    async def _read(
        self, subject: str, model: type[M], start: datetime, stop_id: str | None, limit: int | None
    ) -> tuple[list[M], bool]:
        """Messages on ``subject`` stored from ``start`` on, stopping before ``stop_id``.

        Returns (messages oldest first, True when ``limit`` cut the read short).
        """
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=start.isoformat(),  # type: ignore[arg-type]
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        )
        sub = await self.js.pull_subscribe(
            subject, durable=None, stream=subjects.HISTORY_STREAM, config=config
        )
        out: list[M] = []
        try:
            info = await sub.consumer_info()
            pending = info.num_pending or 0
            while pending > 0:
                want = min(FETCH_BATCH, pending)
                try:
                    batch = await sub.fetch(want, timeout=5)
                except NatsTimeoutError:
                    break
                for m in batch:
                    pending = m.metadata.num_pending
                    try:
                        item = model.model_validate_json(m.data)
                    except ValueError:
                        continue
                    if stop_id is not None and item.id >= stop_id:
                        return out, False
                    out.append(item)
                    if limit is not None and len(out) > limit:
                        return out, True
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out, False

    async def first(self, subject: str, model: type[M]) -> M | None:
        """The oldest retained message on ``subject``."""
        try:
            raw = await self.js.get_msg(subjects.HISTORY_STREAM, seq=1, subject=subject, next=True)
        except NotFoundError:
            return None
        if raw.data is None:
            return None
        try:
            return model.model_validate_json(raw.data)
        except ValueError:
            return None

    async def after(
        self, subject: str, model: type[M], after: str, limit: int
    ) -> tuple[list[M], bool, bool]:
        """Up to ``limit`` messages newer than ``after``: (messages, has_more, gap)."""
        start = id_time(after) - timedelta(milliseconds=1)
        msgs, cut = await self._read(subject, model, start, None, limit)
        msgs = [m for m in msgs if m.id > after]
        has_more = cut or len(msgs) > limit
        msgs = msgs[:limit]
        first = await self.first(subject, model)
        gap = False
        if first is not None and first.id > after:
            # `after` is older than everything kept. That is a gap only if retention ever
            # removed anything (otherwise the subject simply starts after `after`).
            state = (await self.js.stream_info(subjects.HISTORY_STREAM)).state
            gap = state.first_seq > 1 or bool(state.num_deleted)
        return msgs, has_more, gap

    async def before(
        self, subject: str, model: type[M], before: str | None, limit: int
    ) -> tuple[list[M], bool]:
        """The ``limit`` messages just older than ``before`` (or the newest): (msgs, has_more).

        JetStream reads forwards only, so read a time window ending at ``before`` and
        widen it (x4) until it holds ``limit`` messages or reaches the first message.
        """
        first = await self.first(subject, model)
        if first is None:
            return [], False
        oldest = id_time(first.id) - timedelta(milliseconds=1)
        hi = (
            id_time(before) + timedelta(milliseconds=1)
            if before
            else utcnow() + timedelta(seconds=1)
        )
        window = WINDOW_START
        while True:
            lo_time = max(hi - window, oldest)
            collected, _ = await self._read(subject, model, lo_time, before, None)
            if len(collected) >= limit or lo_time <= oldest:
                break
            window *= 4
        page = collected[-limit:]
        has_more = bool(page) and page[0].id > first.id
        return page, has_more
