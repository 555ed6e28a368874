"""Prometheus metrics of the history service."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECEIVED = Counter("roombus_history_received_total", "room messages received from the bus")
STORED = Counter("roombus_history_stored_total", "messages stored (new) in HISTORY")
DUPLICATES = Counter("roombus_history_duplicates_total", "stores JetStream recognised as retries")
STORE_FAILED = Counter("roombus_history_store_failed_total", "stores that got no JetStream ack")
MALFORMED = Counter("roombus_history_malformed_total", "bus payloads dropped as malformed")
INFLIGHT = Gauge("roombus_history_inflight", "stores awaiting their JetStream ack")
QUERIES = Counter("roombus_history_queries_total", "history queries answered", ["kind", "result"])
QUERY_SECONDS = Histogram(
    "roombus_history_query_seconds",
    "time to answer one history query",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
EPHEMERAL = Counter(
    "roombus_history_ephemeral_total", "messages of ephemeral rooms seen and not stored"
)
