"""JetStream provisioning: create or update streams and buckets, never wipe data."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import (
    APIError,
    BadRequestError,
    BucketNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from proto import subjects

log = logging.getLogger("roombus.jetstream")
T = TypeVar("T")


REPLICAS_ADVICE = (
    "Replicas must be 1 on a single nats-server and at most the number of JetStream nodes "
    "of a cluster (3 on the usual three-node cluster): fix the service's *_REPLICAS setting."
)


class ProvisioningError(RuntimeError):
    """A stream could not be brought to the wanted configuration; says what to do."""

    def __init__(self, stream: str, detail: str) -> None:
        self.stream = stream
        self.detail = detail
        super().__init__(f"stream {stream}: {detail}")


def _transient(exc: BaseException) -> bool:
    """Errors of a JetStream that is not ready yet (starting, electing a meta leader, a
    cluster whose nodes are still joining), as opposed to a configuration it refuses."""
    if isinstance(
        exc, NatsTimeoutError | TimeoutError | NoRespondersError | ServiceUnavailableError
    ):
        return True
    if isinstance(exc, APIError):
        # 503: JetStream temporarily unavailable; 10005 "no suitable peers for placement"
        # and 10023 "insufficient resources" while a cluster's peers are still joining.
        return exc.code == 503 or exc.err_code in (10005, 10008, 10023)
    cause = exc.__cause__
    return isinstance(exc, ProvisioningError) and cause is not None and _transient(cause)


async def _retrying(what: str, wait: float, step: Callable[[], Awaitable[T]]) -> T:
    """Run ``step``, retrying while JetStream is not ready, for at most ``wait`` seconds."""
    deadline = time.monotonic() + wait
    delay = 0.25
    attempt = 0
    while True:
        try:
            return await step()
        except Exception as exc:
            if not _transient(exc) or time.monotonic() >= deadline:
                if isinstance(exc, ProvisioningError) or not _transient(exc):
                    raise
                raise ProvisioningError(
                    what, f"JetStream did not become ready within {wait:g}s ({exc!r})"
                ) from exc
            attempt += 1
            if attempt == 1 or attempt % 10 == 0:
                log.warning("JetStream not ready yet, retrying", extra={"asset": what})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def ensure_stream(js: JetStreamContext, config: StreamConfig, wait: float = 60.0) -> None:
    """Create ``config.name`` or update it in place to ``config`` (idempotent, keeps data).

    While JetStream is not ready yet (a cluster forming), retries for up to ``wait`` seconds.
    """
    assert config.name is not None
    await _retrying(config.name, wait, lambda: _ensure_stream(js, config))


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    name = config.name
    assert name is not None
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        try:
            await js.add_stream(config)
        except (BadRequestError, APIError) as exc:
            raise ProvisioningError(
                name,
                f"cannot create it with replicas={config.num_replicas} ({exc.description}). "
                + REPLICAS_ADVICE,
            ) from exc
        log.info("stream created", extra={"stream": name})
        return
    current = info.config
    if current.num_replicas != config.num_replicas:
        log.info(
            "stream replica count changes",
            extra={"stream": name, "from": current.num_replicas, "to": config.num_replicas},
        )
    try:
        await js.update_stream(config)
    except (BadRequestError, APIError) as exc:
        raise ProvisioningError(
            name,
            f"cannot update to the configured settings ({exc.description}). Current: "
            f"replicas={current.num_replicas}, storage={current.storage}. "
            + (REPLICAS_ADVICE + " " if current.num_replicas != config.num_replicas else "")
            + "Change the setting back, or migrate: `nats stream edit` / `nats stream backup` "
            "then recreate.",
        ) from exc
    log.info("stream up to date", extra={"stream": name})


async def ensure_kv(js: JetStreamContext, config: KeyValueConfig, wait: float = 60.0) -> KeyValue:
    """The bucket ``config.bucket``, created when missing.

    An existing bucket keeps its data and settings, except its replica count, which is
    brought to ``config.replicas`` (R1 -> R3 when a deployment moves onto a cluster).
    While JetStream is not ready yet, retries for up to ``wait`` seconds.
    """
    return await _retrying(f"KV_{config.bucket}", wait, lambda: _ensure_kv(js, config))


async def _ensure_kv(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    try:
        kv = await js.key_value(config.bucket)
    except BucketNotFoundError:
        try:
            return await js.create_key_value(config)
        except APIError as exc:
            try:  # another process created it in between?
                kv = await js.key_value(config.bucket)
            except BucketNotFoundError:
                raise ProvisioningError(
                    f"KV_{config.bucket}",
                    f"cannot create bucket {config.bucket!r} with replicas={config.replicas}"
                    f" ({exc.description}). {REPLICAS_ADVICE}",
                ) from exc
    await _ensure_kv_replicas(js, config)
    return kv


async def _ensure_kv_replicas(js: JetStreamContext, config: KeyValueConfig) -> None:
    stream = f"KV_{config.bucket}"
    current = (await js.stream_info(stream)).config
    if current.num_replicas == config.replicas:
        return
    log.info(
        "bucket replica count changes",
        extra={"bucket": config.bucket, "from": current.num_replicas, "to": config.replicas},
    )
    try:
        await js.update_stream(replace(current, num_replicas=config.replicas))
    except (BadRequestError, APIError) as exc:
        raise ProvisioningError(
            stream,
            f"bucket {config.bucket!r} has replicas={current.num_replicas} and cannot be "
            f"changed to {config.replicas} ({exc.description}). {REPLICAS_ADVICE} Or set it "
            f"back to {current.num_replicas}, or `nats kv del {config.bucket}` (its keys are "
            "short-lived) and restart to recreate it.",
        ) from exc


def presence_bucket_config(replicas: int, marker_ttl: float) -> KeyValueConfig:
    """The ``presence`` bucket, identical for the gateways (writers) and presence (reader).

    Keys carry a per-key TTL (``Nats-TTL``); ``limit_marker_ttl`` makes the server write a
    delete marker when one expires, so watchers see a dead gateway's users leave
    (nats-server >= 2.11).
    """
    return KeyValueConfig(
        bucket=subjects.PRESENCE_BUCKET,
        description="roombus presence: room.user.gateway keys with a per-key TTL",
        history=1,
        storage=StorageType.FILE,
        replicas=replicas,
        limit_marker_ttl=marker_ttl,
    )
