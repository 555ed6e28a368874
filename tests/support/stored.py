"""Read what the history service stored, straight from JetStream (as `nats stream view` would)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import nats
from nats.errors import NoRespondersError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError, ServiceUnavailableError

from proto.shards import HistoryLayout


async def stored_messages(nats_url: str, room: str, shards: int = 1) -> list[dict[str, Any]]:
    """Every message stored for ``room`` in its history stream (``HISTORY``, or its shard's
    with ``shards`` > 1), in stream order (with its ``seq``).

    On a cluster whose stream has just changed (replicas raised, a node killed) JetStream can
    answer 503 for a moment (no leader yet for the reading consumer): the read starts again,
    for up to 20 s."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return await _stored_messages(nats_url, room, shards)
        except (ServiceUnavailableError, NoRespondersError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _stored_messages(nats_url: str, room: str, shards: int) -> list[dict[str, Any]]:
    layout = HistoryLayout(shards)
    stream, subject = layout.room_stream(room), layout.room_subject(room)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream, subjects_filter=subject)
        except NotFoundError:
            return []
        total = (info.state.subjects or {}).get(subject, 0)
        if not total:
            return []
        sub = await js.pull_subscribe(
            subject,
            durable=None,
            stream=stream,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, mem_storage=True
            ),
        )
        out: list[dict[str, Any]] = []
        while len(out) < total:
            for m in await sub.fetch(min(500, total - len(out)), timeout=10):
                out.append({**json.loads(m.data), "seq": m.metadata.sequence.stream})
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()
