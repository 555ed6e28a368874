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
from prometheus_client import Counter

from proto import subjects

from .backoff import Backoff
from .logs import RateLimitedLog

log = logging.getLogger("roombus.jetstream")
T = TypeVar("T")

STORAGE_REFUSED = Counter(
    "roombus_jetstream_storage_refused_total",
    "writes JetStream refused for lack of space (reason: server = its store is full, "
    "bound = the stream's own byte bound is reached)",
    ["asset", "reason"],
)
_storage_log = RateLimitedLog(log, interval=10.0)

REPLICAS_ADVICE = (
    "Replicas must be 1 on a single nats-server and at most the number of JetStream nodes "
    "of a cluster (3 on the usual three-node cluster): fix the service's *_REPLICAS setting."
)

PRESENCE_MAX_BYTES_DEFAULT = 64 * 1024**2
"""Byte bound of each presence bucket when the presence service has not set its own."""

# The setting that sets each asset's byte bound: what a storage error tells the operator to
# change. Every stream and bucket roombus creates is bounded, so JetStream reserves its
# bytes when it is created: a bound that does not fit fails at start, not when the disk is
# full.
BOUND_SETTINGS: dict[str, str] = {
    subjects.HISTORY_STREAM: "HISTORY_MAX_BYTES",
    # The gateways create it too, with the default bound, when they start first.
    f"KV_{subjects.PRESENCE_BUCKET}": "PRESENCE_MAX_BYTES (presence service; start it first)",
    f"KV_{subjects.PRESENCE_ANNOUNCED_BUCKET}": "PRESENCE_MAX_BYTES",
}

# JetStream API error codes (nats-server's errors.json).
ERR_INSUFFICIENT_STORAGE = 10047  # "insufficient storage resources available" (reservation)
ERR_INSUFFICIENT_RESOURCES = 10023  # "insufficient resources": the server's store is full
ERR_MAX_BYTES = 10077  # "maximum bytes exceeded": a DiscardNew stream at its own bound
ERR_NO_PEERS = 10005  # "no suitable peers for placement"
ERR_REPLICAS_UNSUPPORTED = 10074  # "replicas > 1 not supported in non-clustered mode"


def _bound_setting(asset: str) -> str:
    if subjects.parse_history_stream(asset) is not None:  # a shard: HISTORY_MAX_BYTES / K
        return "HISTORY_MAX_BYTES (split between the HISTORY_SHARDS streams)"
    return BOUND_SETTINGS.get(asset, "its max_bytes")


def _fmt_bytes(n: int | None) -> str:
    if n is None or n < 0:
        return "unlimited"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.4g} {unit} ({n} bytes)"
    return f"{n} bytes"


def _refusal_advice(asset: str, max_bytes: int | None, exc: APIError) -> str:
    """What to change when JetStream refuses to create or resize ``asset``."""
    if exc.err_code in (ERR_INSUFFICIENT_STORAGE, ERR_INSUFFICIENT_RESOURCES):
        return (
            f"JetStream cannot reserve {_fmt_bytes(max_bytes)} for it: the bounds of every "
            "stream and bucket must fit in the server's max_file_store (and the account's "
            f"max_storage). Lower {_bound_setting(asset)}, or give JetStream more storage."
        )
    return REPLICAS_ADVICE


def storage_refusal(exc: BaseException) -> str | None:
    """``"server"`` when a write failed because JetStream's store is full, ``"bound"`` when
    the stream is at its own byte bound (and refuses new messages), else None."""
    if isinstance(exc, APIError):
        if exc.err_code == ERR_INSUFFICIENT_RESOURCES:
            return "server"
        if exc.err_code == ERR_MAX_BYTES:
            return "bound"
    return None


def note_storage_refusal(asset: str | None, exc: BaseException) -> bool:
    """Count and log (rate-limited) a write refused for lack of space; False for other errors.

    ``asset`` is the stream written to, None when unknown (the error of an async publish
    reaches only the connection's error callback). The log line says why and what to
    change, so "acks stopped" is never a mystery.
    """
    reason = storage_refusal(exc)
    if reason is None:
        return False
    name = asset or "unknown"
    STORAGE_REFUSED.labels(name, reason).inc()
    if reason == "server":
        advice = (
            "JetStream's store is full (its max_file_store, or the disk): something outside "
            "the bounds it reserved for roombus's streams uses the space. Free it, or raise "
            "max_file_store; writes resume by themselves once there is room."
        )
    else:
        advice = f"{name} is at its byte bound: raise {_bound_setting(name)}."
    _storage_log.warning(
        f"storage_{reason}_{name}",
        "JetStream refused a write: no space",
        asset=name,
        reason=reason,
        advice=advice,
        error=getattr(exc, "description", None) or repr(exc),
    )
    return True


async def check_storage_limits(
    js: JetStreamContext, asset: str, max_bytes: int | None, replicas: int
) -> None:
    """Fail at start, naming the setting, when ``asset``'s bound breaks the account's limits.

    The account's limits (``max_storage``, ``max_bytes_required``, the per-stream maximum)
    are what ``$JS.API.INFO`` reports; the server's own ``max_file_store`` is not, so a bound
    over it is caught when the server refuses the reservation (see ``_refusal_advice``).
    """
    info = await js.account_info()
    limits = info.limits
    setting = _bound_setting(asset)
    unbounded = max_bytes is None or max_bytes < 0
    if unbounded and limits.max_bytes_required:
        raise ProvisioningError(
            asset, f"it has no byte bound but the JetStream account requires one: set {setting}."
        )
    if unbounded:
        if limits.max_storage >= 0:
            log.warning(
                "unbounded stream: it can fill the account's JetStream storage",
                extra={"asset": asset, "max_storage": limits.max_storage},
            )
        return
    assert max_bytes is not None
    if 0 <= limits.storage_max_stream_bytes < max_bytes:
        raise ProvisioningError(
            asset,
            f"{setting}={max_bytes} is over the account's largest stream "
            f"({_fmt_bytes(limits.storage_max_stream_bytes)}): lower {setting}.",
        )
    if 0 <= limits.max_storage < max_bytes * replicas:
        raise ProvisioningError(
            asset,
            f"{setting}={max_bytes} x {replicas} replicas is over the account's JetStream "
            f"storage ({_fmt_bytes(limits.max_storage)}, {_fmt_bytes(info.storage)} in use): "
            f"lower {setting}.",
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


async def retrying(what: str, wait: float, step: Callable[[], Awaitable[T]]) -> T:
    """Run ``step``, retrying while JetStream is not ready, for at most ``wait`` seconds."""
    deadline = time.monotonic() + wait
    backoff = Backoff(0.25, 2.0)
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
            await asyncio.sleep(backoff.next())


async def ensure_stream(js: JetStreamContext, config: StreamConfig, wait: float = 60.0) -> None:
    """Create ``config.name`` or update it in place to ``config`` (idempotent, keeps data).

    ``num_replicas=None`` means the default (:func:`default_replicas`, never lowering an
    existing stream's).

    While JetStream is not ready yet (a cluster forming), retries for up to ``wait`` seconds.
    """
    assert config.name is not None
    await retrying(config.name, wait, lambda: _ensure_stream(js, config))


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    name = config.name
    assert name is not None
    await check_storage_limits(js, name, config.max_bytes, config.num_replicas or 1)
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        config = replace(config, num_replicas=_resolve(config.num_replicas, None, js._nc))
        try:
            await js.add_stream(config)
        except (BadRequestError, APIError) as exc:
            raise ProvisioningError(
                name,
                f"cannot create it with replicas={config.num_replicas}, max_bytes="
                f"{config.max_bytes} ({exc.description}). "
                + _refusal_advice(name, config.max_bytes, exc),
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
            f"replicas={current.num_replicas}, max_bytes={current.max_bytes}, "
            f"storage={current.storage}. "
            + (
                _refusal_advice(name, config.max_bytes, exc) + " "
                if exc.err_code in (ERR_INSUFFICIENT_STORAGE, ERR_INSUFFICIENT_RESOURCES)
                or current.num_replicas != config.num_replicas
                else ""
            )
            + "Change the setting back, or migrate: `nats stream edit` / `nats stream backup` "
            "then recreate.",
        ) from exc
    log.info("stream up to date", extra={"stream": name})


async def ensure_kv(
    js: JetStreamContext, config: KeyValueConfig, wait: float = 60.0, *, owner: bool = False
) -> KeyValue:
    """The bucket ``config.bucket``, created when missing.

    An existing bucket keeps its data and settings, except its replica count, which is
    brought to ``config.replicas`` (R1 -> R3 when a deployment moves onto a cluster;
    ``replicas=None`` means the default, :func:`default_replicas`, never lowered), and its
    byte bound: an unbounded bucket gets ``config.max_bytes``, and the bucket's ``owner``
    (the service whose setting sets the bound) brings it to ``config.max_bytes``.
    While JetStream is not ready yet, retries for up to ``wait`` seconds.
    """
    return await retrying(f"KV_{config.bucket}", wait, lambda: _ensure_kv(js, config, owner))


async def _ensure_kv(js: JetStreamContext, config: KeyValueConfig, owner: bool) -> KeyValue:
    stream = f"KV_{config.bucket}"
    try:
        kv = await js.key_value(config.bucket)
    except BucketNotFoundError:
        config = replace(config, replicas=_resolve(config.replicas, None, js._nc))
        await check_storage_limits(js, stream, config.max_bytes, config.replicas)
        try:
            return await js.create_key_value(config)
        except APIError as exc:
            try:  # another process created it in between?
                kv = await js.key_value(config.bucket)
            except BucketNotFoundError:
                raise ProvisioningError(
                    stream,
                    f"cannot create bucket {config.bucket!r} with replicas={config.replicas}, "
                    f"max_bytes={config.max_bytes} ({exc.description}). "
                    + _refusal_advice(stream, config.max_bytes, exc),
                ) from exc
    await _ensure_kv_limits(js, config, owner)
    return kv


async def _ensure_kv_limits(js: JetStreamContext, config: KeyValueConfig, owner: bool) -> None:
    stream = f"KV_{config.bucket}"
    current = (await js.stream_info(stream)).config
    config = replace(config, replicas=_resolve(config.replicas, current.num_replicas, js._nc))
    wanted = current
    if current.num_replicas != config.replicas:
        log.info(
            "bucket replica count changes",
            extra={"bucket": config.bucket, "from": current.num_replicas, "to": config.replicas},
        )
        wanted = replace(wanted, num_replicas=config.replicas)
    unbounded = current.max_bytes is None or current.max_bytes < 0
    if config.max_bytes is not None and current.max_bytes != config.max_bytes:
        if owner or unbounded:
            log.info(
                "bucket byte bound changes",
                extra={"bucket": config.bucket, "from": current.max_bytes, "to": config.max_bytes},
            )
            wanted = replace(wanted, max_bytes=config.max_bytes)
    if wanted is current:
        return
    await check_storage_limits(js, stream, wanted.max_bytes, wanted.num_replicas or 1)
    try:
        await js.update_stream(wanted)
    except (BadRequestError, APIError) as exc:
        if exc.err_code in (ERR_INSUFFICIENT_STORAGE, ERR_INSUFFICIENT_RESOURCES):
            raise ProvisioningError(
                stream,
                f"bucket {config.bucket!r} cannot grow to max_bytes={config.max_bytes} "
                f"({exc.description}). " + _refusal_advice(stream, config.max_bytes, exc),
            ) from exc
        raise ProvisioningError(
            stream,
            f"bucket {config.bucket!r} has replicas={current.num_replicas} and cannot be "
            f"changed to {config.replicas} ({exc.description}). {REPLICAS_ADVICE} Or set it "
            f"back to {current.num_replicas}, or `nats kv del {config.bucket}` (its keys are "
            "short-lived) and restart to recreate it.",
        ) from exc


def presence_bucket_config(
    replicas: int | None, marker_ttl: float, max_bytes: int = PRESENCE_MAX_BYTES_DEFAULT
) -> KeyValueConfig:
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
        max_bytes=max_bytes,
    )
