"""Prometheus metrics of the bridge."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

FORWARDED = Counter(
    "roombus_bridge_forwarded_total", "Messages carried across the bridge", ["direction"]
)
DROPPED = Counter(
    "roombus_bridge_dropped_total",
    "Messages not forwarded (bad payload or room, echo of our own, duplicate, overflow)",
    ["direction", "reason"],
)
REDIS_CONNECTED = Gauge("roombus_bridge_redis_connected", "1 while the Redis subscription is up")
REDIS_RECONNECTS = Counter("roombus_bridge_redis_reconnects_total", "Redis reconnections")
ACTIVE = Gauge(
    "roombus_bridge_active", "1 while this replica holds the lease and forwards Redis -> NATS"
)
QUEUED = Gauge("roombus_bridge_queued", "NATS -> Redis messages waiting for Redis")
