"""A three-node JetStream cluster on free loopback ports, and what tests ask it.

The nodes are ``services.natsserver.NatsCluster`` (also behind ``roombus up --nats-cluster``):
each has its own store dir and config file, routes to every node, and a monitoring port.
``start()`` returns once the routes are up and the JetStream meta leader is elected.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors

from services.natsserver import NatsCluster, NatsServer

__all__ = [
    "NatsCluster",
    "local_leader_view",
    "local_stream_state",
    "move_leader",
    "move_leader_off",
    "new_leader",
    "start_cluster",
    "stream_leader",
]


def start_cluster(base_dir: Path, size: int = 3) -> NatsCluster:
    return NatsCluster(base_dir=base_dir, size=size).start(timeout=45)


async def stream_leader(urls: str, stream: str, timeout: float = 20.0) -> str:
    """Server name of ``stream``'s current leader (``cluster.leader`` of its info).

    Waits through an election (a stream or the meta group without a leader for a while).
    """
    nc = await nats.connect(urls.split(","), connect_timeout=2, max_reconnect_attempts=2)
    js = nc.jetstream(timeout=2)
    deadline = time.monotonic() + timeout
    last: object = None
    try:
        while time.monotonic() < deadline:
            try:
                info = await js.stream_info(stream)
                last = info.cluster
                if info.cluster is not None and info.cluster.leader:
                    return info.cluster.leader
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                last = exc
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    raise AssertionError(f"stream {stream} has no leader after {timeout}s: {last!r}")


async def new_leader(urls: str, stream: str, old: str, timeout: float = 30.0) -> str:
    """Wait until ``stream`` reports a leader other than ``old`` (an election after a loss)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leader = await stream_leader(urls, stream, timeout=deadline - time.monotonic())
        if leader != old:
            return leader
        await asyncio.sleep(0.05)
    raise AssertionError(f"{stream}: no new leader after {old} in {timeout}s")


async def _step_down(urls: str, stream: str, preferred: str | None) -> None:
    """Ask ``stream``'s leader to step down; the callers check the outcome and ask again
    (a leader mid-election does not answer, a preferred peer still catching up is refused)."""
    body = json.dumps({"placement": {"preferred": preferred}}).encode() if preferred else b""
    nc = await nats.connect(urls.split(","), connect_timeout=2)
    try:
        await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", body, timeout=2)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        pass
    finally:
        await nc.close()


async def move_leader(urls: str, stream: str, to: str) -> None:
    """Make the node named ``to`` the leader of ``stream`` (a step-down with a preference)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if await stream_leader(urls, stream) == to:
            return
        await _step_down(urls, stream, to)
        for _ in range(50):
            if await stream_leader(urls, stream) == to:
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"{stream}: leadership did not move to {to}")


async def move_leader_off(urls: str, stream: str, server: str) -> str:
    """Make ``stream``'s leader some node other than ``server``; returns the leader."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        leader = await stream_leader(urls, stream)
        if leader != server:
            return leader
        await _step_down(urls, stream, None)
        await asyncio.sleep(0.2)
    raise AssertionError(f"{stream}: leadership did not move off {server}")


def _local_detail(node: NatsServer, stream: str) -> dict[str, Any] | None:
    jsz = node.monitor("/jsz?accounts=true&streams=true")
    for account in jsz.get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            if detail.get("name") == stream:
                found: dict[str, Any] = detail
                return found
    return None


def local_stream_state(node: NatsServer, stream: str) -> dict[str, Any] | None:
    """The state of ``node``'s own replica of ``stream``, from its ``/jsz`` endpoint.

    Monitoring answers from the node's local store, not from the leader: this is how a
    restarted node shows it has caught up (``messages``, ``first_seq``, ``last_seq``).
    ``None`` while the node does not host the stream (yet).
    """
    detail = _local_detail(node, stream)
    return None if detail is None else detail.get("state") or {}


def local_leader_view(node: NatsServer, stream: str) -> str | None:
    """Who ``node`` currently believes leads ``stream`` (its raft view, from ``/jsz``)."""
    detail = _local_detail(node, stream)
    leader = ((detail or {}).get("cluster") or {}).get("leader")
    return str(leader) if leader else None
