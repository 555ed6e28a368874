"""Prometheus metrics of the presence service."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ROOMS = Gauge("roombus_presence_rooms", "rooms with at least one member (at last load)")
EVENTS = Counter("roombus_presence_events_total", "join/leave transitions", ["type", "result"])
MALFORMED = Counter("roombus_presence_malformed_total", "bucket keys that are not room.user.gw")
QUERIES = Counter("roombus_presence_queries_total", "presence queries answered")
QUERIES_STALE = Counter(
    "roombus_presence_queries_stale_total",
    "Queries answered before the fold reached the bucket's revision at query time",
)
RECONCILED = Counter(
    "roombus_presence_reconciled_total",
    "joins/leaves announced at (re)start: they happened while no replica was watching",
    ["type"],
)
