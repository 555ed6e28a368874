"""Prometheus metrics of the gateway."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("roombus_gateway_open_connections", "Open WebSocket connections")
CONNECTIONS_TOTAL = Counter(
    "roombus_gateway_accepted_connections_total", "Accepted WebSocket connections"
)
REFUSED = Counter("roombus_gateway_refused_total", "Refused connection attempts", ["reason"])
ROOMS = Gauge("roombus_gateway_rooms", "Rooms with at least one local member")
SUBSCRIBE_MODE = Gauge(
    "roombus_gateway_subscribe_mode",
    "1 on how room traffic reaches this gateway now: wildcard or rooms (SUBSCRIBE)",
    ["mode"],
)
ROOM_SUBSCRIPTIONS = Gauge(
    "roombus_gateway_room_subscriptions",
    "Rooms subscribed to one by one (SUBSCRIBE=rooms or auto), lingering ones included",
)
ROOM_SUBSCRIBES = Counter(
    "roombus_gateway_room_subscribes_total",
    "Rooms subscribed to one by one: first local joins not caught by a linger",
)
SUBSCRIBE_SWITCHES = Counter(
    "roombus_gateway_subscribe_switches_total", "SUBSCRIBE=auto switches", ["to"]
)
FRAMES_IN = Counter("roombus_gateway_frames_in_total", "Client frames received", ["type"])
CLIENT_ERRORS = Counter("roombus_gateway_client_errors_total", "Error frames sent", ["code"])
PUBLISHED = Counter("roombus_gateway_published_total", "Messages published to the bus", ["kind"])
BUS_IN = Counter("roombus_gateway_bus_messages_total", "Bus messages received", ["kind"])
BUS_MALFORMED = Counter(
    "roombus_gateway_bus_malformed_total", "Bus payloads dropped as malformed", ["kind"]
)
STORAGE_UP = Gauge(
    "roombus_gateway_storage_up", "1 while sends are being stored; 0 since one could not be"
)
NOT_STORED = Counter("roombus_gateway_not_stored_total", "Messages never acked by storage")
ACK_SECONDS = Histogram(
    "roombus_gateway_ack_seconds",
    "Time from publish to storage ack",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
REPLAYED = Counter("roombus_gateway_replayed_total", "Stored messages replayed on join")
DUPLICATES = Counter(
    "roombus_gateway_duplicates_total",
    "Republished messages already delivered (by a heal, or the other way during a switch)",
)
GAPS = Counter("roombus_gateway_gaps_total", "Gaps in a room's or inbox's sequence (prev mismatch)")
RECHECK_HEALS = Counter(
    "roombus_gateway_recheck_heals_total",
    "Feeds that found, re-reading the stream's end after they started, a message whose live "
    "copy never came (healed)",
)
READ_BEHIND = Counter(
    "roombus_gateway_read_behind_total",
    "Stream reads answered by a replica behind the message they had to reach (read again)",
)
HEALED = Counter("roombus_gateway_healed_total", "Stored messages read from the stream to heal")
HEAL_SECONDS = Histogram(
    "roombus_gateway_heal_seconds",
    "Time for a feed to catch up with the stream (start, gap or reconnect)",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30),
)
NOT_RECOVERED = Counter(
    "roombus_gateway_not_recovered_total", "Joins with since answered recovered=false", ["reason"]
)
DELIVERED = Counter("roombus_gateway_delivered_total", "Frames queued to clients by fan-out")
DROPPED = Counter("roombus_gateway_dropped_total", "Frames dropped for one client", ["reason"])
SLOW_DISCONNECTS = Counter(
    "roombus_gateway_slow_disconnects_total", "Clients disconnected for not reading"
)
FANOUT_SECONDS = Histogram(
    "roombus_gateway_fanout_seconds",
    "Time to fan one bus message out to local clients",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
)
API_REQUESTS = Counter("roombus_gateway_api_requests_total", "HTTP publish API answers", ["status"])
SSE_STREAMS = Gauge("roombus_gateway_sse_streams", "Open Server-Sent Events streams")

# Label children on hot paths, looked up once (``labels()`` takes a lock and hashes each call).
BUS_IN_ROOM_MESSAGE = BUS_IN.labels("room_message")
PUBLISHED_CHAT = PUBLISHED.labels("chat")
DROPPED_SLOW_CLIENT = DROPPED.labels("slow_client")
frames_in = functools.cache(FRAMES_IN.labels)
