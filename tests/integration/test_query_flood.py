"""A history-query flood from one user (or twenty) cannot deny history to anyone else: reads
are direct gets (no consumer per query), work per query is bounded by its limit, each user
has a query budget, a replica reads a bounded number at once and drops queries whose
requester gave up."""

from __future__ import annotations

import asyncio
import statistics
import time

import nats

from tests.conftest import ServiceFactory
from tests.support.client import Client
from tests.support.procs import NatsServer


async def _page(c: Client, room: str, before: int | None = None) -> float:
    started = time.perf_counter()
    await c.send("history", room=room, limit=50, **({"before": before} if before else {}))
    page = await c.next("history", timeout=15, room=room)
    assert page["data"]["messages"], "an empty page"
    return time.perf_counter() - started


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


async def test_a_query_flood_does_not_deny_history_to_others(
    fresh_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    services("history", fresh_nats)
    services("history", fresh_nats)
    flooded = services("gateway", fresh_nats, HISTORY_RATE=5, HISTORY_BURST=20)
    honest_gw = services("gateway", fresh_nats)
    # A room with a long past, and one whose only message is old (the original attack).
    nc = await nats.connect(fresh_nats.url)
    try:
        for i in range(3000):
            await nc.publish(f"room.{room}.message", b'{"user":"seed","text":"m%d"}' % i)
        await nc.request(f"room.{room}-old.message", b'{"user":"seed","text":"old"}', timeout=5)
        await nc.request(f"room.{room}.message", b'{"user":"seed","text":"last"}', timeout=5)
        deadline = time.monotonic() + 60
        while (await nc.jetstream().stream_info("HISTORY")).state.messages < 3002:
            assert time.monotonic() < deadline, "the seed was never stored"
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    honest = await Client.open(honest_gw.ws_url, "honest")
    await honest.join(room)

    async def pages(n: int) -> list[float]:
        return [await _page(honest, room, before=2000) for _ in range(n)]

    await pages(20)  # warm up (first reads of the stream, caches)
    flooders = [await Client.open(flooded.ws_url, f"flood{i}") for i in range(20)]
    for f in flooders:
        await f.join(f"{room}-old")

    async def flood(f: Client, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await f.send("history", room=f"{room}-old", limit=1)
            await asyncio.sleep(0.01)  # ~100 queries/s per connection, 2,000/s in all

    # Quiet and flooded windows alternate, so whatever else loads the machine weighs on both.
    quiet: list[float] = []
    loud: list[float] = []
    for _ in range(5):
        quiet += await pages(20)
        stop = asyncio.Event()
        floods = [asyncio.create_task(flood(f, stop)) for f in flooders]
        await asyncio.sleep(0.3)
        try:
            loud += await pages(20)
        finally:
            stop.set()
            await asyncio.gather(*floods)
    limited = sum(len(f.of("error", code="rate_limited")) for f in flooders)
    answered = sum(len(f.of("history")) for f in flooders)
    assert limited > 0, "the flood was never rate limited"
    assert not honest.of("error"), honest.of("error")[:3]
    nc = await nats.connect(fresh_nats.url)
    try:
        consumers = (await nc.jetstream().stream_info("HISTORY")).state.consumer_count
    finally:
        await nc.close()
    assert consumers == 0  # no resource that grows per query
    q, p = _p99(quiet), _p99(loud)
    mq, ml = statistics.median(quiet), statistics.median(loud)
    print(
        f"honest median {mq * 1000:.1f} / {ml * 1000:.1f} ms; p99 {q * 1000:.1f} ms quiet,"
        f" {p * 1000:.1f} ms during a flood of 20"
        f" connections ({answered} flood queries answered, {limited} refused)"
    )
    # Denial is what this guards against: the honest client's queries queued behind the
    # flood until they time out (REQUEST_TIMEOUT, 2 s: `error unavailable`, asserted above)
    # or nearly. Not a latency figure: the flooders' 2,000 frames/s, both replicas, NATS and
    # this test share the machine's 2 cores, and with other work beside the suite the
    # flooded p99 was 11-82 ms quiet but 168 ms with a load average of 11 (2x the quiet p99
    # + 100 ms failed there). Half the request timeout still tells denial from load.
    assert p < 1.0, f"history pages took up to {p:.2f} s during the flood"
