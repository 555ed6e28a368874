"""JetStream provisioning: create or update streams and buckets, never wipe data."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from nats.aio.client import Client
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


REPLICAS_DEFAULT = 0
"""``KeyValueConfig.replicas`` (an int in nats-py) meaning "the default": :func:`ensure_kv`
resolves it, as it resolves ``StreamConfig.num_replicas=None``."""

DEFAULT_REPLICAS_MAX = 3
"""Replicas a stream or bucket gets by default on a cluster of this many nodes or more."""


def cluster_size(nc: Client) -> int:
    """How many nodes the connected server says its cluster has (1 for a single server).

    From the server's INFO (nats-py 2.16 keeps it only as ``Client._server_info``): no
    ``cluster`` field means a single server; otherwise the client URLs the cluster advertises
    (``connect_urls``, one per node on the usual setups). A cluster that advertises none
    (``no_advertise``) is counted by the URLs the client was given (``NATS_URL``).
    """
    info: dict[str, object] = getattr(nc, "_server_info", None) or {}
    if not info.get("cluster"):
        return 1
    urls = info.get("connect_urls")
    if isinstance(urls, list) and urls:
        return len(set(urls))
    return max(1, len(nc.servers))


def default_replicas(nc: Client) -> int:
    """``min(3, cluster size)``: what an unset ``*_REPLICAS`` setting means."""
    return min(DEFAULT_REPLICAS_MAX, cluster_size(nc))


def _resolve(configured: int | None, current: int | None, nc: Client) -> int:
    """The replica count to provision. Set: that. Unset: :func:`default_replicas`, but never
    below what an existing stream has (a service starting while the cluster is still forming
    may see fewer nodes; lowering replicas takes an explicit setting)."""
    if configured:
        return configured
    return max(default_replicas(nc), current or 1)


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

    ``num_replicas=None`` means the default (:func:`default_replicas`, never lowering an
    existing stream's).

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
        config = replace(config, num_replicas=_resolve(config.num_replicas, None, js._nc))
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
    config = replace(
        config, num_replicas=_resolve(config.num_replicas, current.num_replicas, js._nc)
    )
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
    brought to ``config.replicas`` (R1 -> R3 when a deployment moves onto a cluster);
    ``replicas=None`` means the default (:func:`default_replicas`, never lowered).
    While JetStream is not ready yet, retries for up to ``wait`` seconds.
    """
    return await _retrying(f"KV_{config.bucket}", wait, lambda: _ensure_kv(js, config))


async def _ensure_kv(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    try:
        kv = await js.key_value(config.bucket)
    except BucketNotFoundError:
        config = replace(config, replicas=_resolve(config.replicas, None, js._nc))
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
    config = replace(config, replicas=_resolve(config.replicas, current.num_replicas, js._nc))
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


def presence_bucket_config(replicas: int | None, marker_ttl: float) -> KeyValueConfig:
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
        replicas=replicas or REPLICAS_DEFAULT,
        limit_marker_ttl=marker_ttl,
    )
