"""The history streams (``HISTORY`` or its shards): provisioning (with RePublish) and storing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import orjson
from nats.aio.client import NO_RESPONDERS_STATUS
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RePublish, StorageType, StreamConfig
from nats.js.errors import APIError, NoStreamResponseError

from services.backoff import Backoff
from services.jetstream import ensure_stream
from services.shards import ensure_layout

from .settings import HistorySettings

log = logging.getLogger("roombus.history.store")


def stream_config(settings: HistorySettings, shard: int = 0) -> StreamConfig:
    """A history stream (``HISTORY``, or shard ``shard``'s ``HISTORY_<p>``): every stored
    message is republished on ``stored.history.<room>`` / ``stored.inbox.<user>`` once stored,
    with its ``Nats-Sequence`` and the previous sequence on the same subject
    (``Nats-Last-Sequence``): the one order of each room every gateway fans out in."""
    layout = settings.layout
    src, dest = layout.republish(shard)
    what = "history.<room> and inbox.<user> (direct messages)"
    if layout.sharded:
        what = f"shard {shard} of {layout.shards}: " + " and ".join(layout.stream_subjects(shard))
    return StreamConfig(
        name=layout.stream(shard),
        description=f"roombus chat history: {what}",
        subjects=layout.stream_subjects(shard),
        storage=StorageType.FILE,
        num_replicas=settings.history_replicas,
        max_age=settings.history_max_age,
        max_msgs_per_subject=settings.history_max_msgs_per_room,
        # The one byte budget, split: changing the shard count does not change what
        # JetStream reserves.
        max_bytes=max(1, settings.history_max_bytes // layout.shards),
        discard=DiscardPolicy.OLD,
        duplicate_window=settings.history_dedupe_window,
        allow_direct=True,
        republish=RePublish(src=src, dest=dest),
        metadata=layout.metadata(shard),
    )


class Store:
    """Writes to the history streams."""

    def __init__(self, js: JetStreamContext, settings: HistorySettings) -> None:
        self.js = js
        self.settings = settings

    async def provision(self) -> None:
        """Every shard's stream, created or brought to the settings; refused (LayoutError)
        when the streams present are another shard count's."""
        layout = self.settings.layout
        await ensure_layout(self.js, layout, self.settings.jetstream_wait)
        for shard in range(layout.shards):
            config = stream_config(self.settings, shard)
            await ensure_stream(self.js, config, self.settings.jetstream_wait)

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


Done = Callable[[int, bool, BaseException | None], Awaitable[None]]
"""Called once per windowed publish: (stream seq, was a duplicate, None) or (0, False, error)."""


def _api_error(err: dict[str, object]) -> APIError:
    """JetStream's error reply as its exception (nats-py's ``from_error`` raises it)."""
    try:
        APIError.from_error(err)
    except APIError as exc:
        return exc
    return APIError(description=str(err))  # not reached: from_error always raises


class _Pending:
    __slots__ = ("subject", "payload", "headers", "deadline", "delay", "done")

    def __init__(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None,
        deadline: float,
        done: Done,
    ) -> None:
        self.subject = subject
        self.payload = payload
        self.headers = headers
        self.deadline = deadline
        self.delay = 0.1
        self.done = done


class Window:
    """JetStream publishes in flight without a task or an awaited PubAck per message.

    Each publish goes out with its own reply subject under one inbox this window subscribes
    to; the PubAck (or the refusal, or the server's "no responders" status) is read there and
    handed to the publish's ``done`` as it arrives. nats-py's ``publish_async`` does the same
    but its reply handler loses JetStream's refusals (a full store must be answered at once),
    so the raw replies are read here. Bounded by the caller (``HISTORY_INFLIGHT``).
    """

    def __init__(self, nc: NATS, timeout: float) -> None:
        self.nc = nc
        self.timeout = timeout
        self._prefix = nc.new_inbox() + "."
        self._cut = len(self._prefix)
        self._pending: dict[str, _Pending] = {}
        self._next = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._drained: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        await self.nc.subscribe(
            self._prefix + "*",
            cb=self._on_reply,
            pending_msgs_limit=200_000,
            pending_bytes_limit=64 * 1024 * 1024,
        )
        self._sweeper = asyncio.create_task(self._sweep(), name="history-window-sweep")

    async def stop(self, wait: float) -> None:
        """Let publishes in flight get their PubAcks (at most ``wait`` s), then stop."""
        if self._pending:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), wait)
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, done: Done
    ) -> None:
        """Send one message to the stream; ``done`` is awaited when its PubAck arrives (or the
        store fails: a refusal, no stream leader until the timeout, no PubAck in time)."""
        self._next += 1
        token = str(self._next)
        deadline = asyncio.get_running_loop().time() + self.timeout
        self._pending[token] = _Pending(subject, payload, headers, deadline, done)
        try:
            await self.nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
        except Exception as exc:
            self._pop(token)
            await done(0, False, exc)

    def _pop(self, token: str) -> _Pending | None:
        pending = self._pending.pop(token, None)
        if not self._pending and self._drained is not None:
            self._drained.set()
        return pending

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[self._cut :]
        pending = self._pending.get(token)
        if pending is None:
            return  # timed out already
        hdrs = msg.headers
        if hdrs and hdrs.get("Status") == NO_RESPONDERS_STATUS:
            # The stream has no leader (an election takes seconds): the same message again,
            # same reply subject, until the timeout, so the ack follows the election.
            loop = asyncio.get_running_loop()
            if loop.time() + pending.delay < pending.deadline:
                loop.call_later(pending.delay, self._resend, token)
                pending.delay = min(pending.delay * 2, 0.5)
                return
            self._pop(token)
            await pending.done(0, False, NoStreamResponseError())
            return
        self._pop(token)
        try:
            resp = orjson.loads(msg.data)
            err = resp.get("error")
            if err is not None:
                exc: BaseException = _api_error(err)
            else:
                await pending.done(int(resp["seq"]), bool(resp.get("duplicate")), None)
                return
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as bad:
            exc = bad
        await pending.done(0, False, exc)

    def _resend(self, token: str) -> None:
        pending = self._pending.get(token)
        if pending is not None:
            asyncio.get_running_loop().create_task(self._republish(token, pending))

    async def _republish(self, token: str, pending: _Pending) -> None:
        try:
            await self.nc.publish(
                pending.subject,
                pending.payload,
                reply=self._prefix + token,
                headers=pending.headers,
            )
        except Exception:  # reconnecting: the sweep ends it at its deadline
            pass

    async def _sweep(self) -> None:
        """Publishes without a PubAck by their deadline fail (the sender retries)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(0.25, self.timeout / 4))
            now = loop.time()
            late = [t for t, p in self._pending.items() if p.deadline <= now]
            for token in late:
                pending = self._pop(token)
                if pending is not None:
                    try:
                        await pending.done(0, False, TimeoutError("no PubAck in time"))
                    except Exception:
                        log.exception("store completion failed")
