"""The Python client under faults, mid-traffic: a kill -9 of the gateway it is on (it moves to
the next URL), a broker restart, a 10 s network cut and a 10 s silent pause between the client
and its gateway. The consumer sees every stored message once, in stream order, and every send
is acked once (and stored once). ``pytest tests/integration/test_client_faults.py -s`` prints
the counts."""

from __future__ import annotations

import asyncio
import time

import pytest
from roombus_client import ChatMessage, Client, NotRecovered

from tests.conftest import ServiceFactory
from tests.integration.test_client import collect, produce, wait_until, ws
from tests.support.procs import NatsServer
from tests.support.stored import stored_messages
from tests.support.tcpproxy import TcpProxy

N = 400  # per producer
PACE = 0.03  # 12 s of traffic: the fault (up to 10 s) falls in the middle


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "fault", ["gateway_kill_9", "broker_kill_9_restart", "network_cut_10s", "network_pause_10s"]
)
async def test_consumer_sees_every_message_once_in_order_and_every_send_is_acked_once(
    fresh_nats: NatsServer, services: ServiceFactory, room: str, fault: str
) -> None:
    services("history", fresh_nats)
    services("history", fresh_nats)
    ga, gb = services("gateway", fresh_nats), services("gateway", fresh_nats)
    proxy = await TcpProxy(ga.port).start()
    # Through the proxy the client has only that way in: it must wait for the link to return.
    urls = [ws(proxy.port)] if fault.startswith("network") else [ws(ga.port), ws(gb.port)]
    consumer = Client(urls, user="consumer", backoff_max=2.0)
    p1 = Client(urls, user="p1", backoff_max=2.0)  # on the faulty path too
    p2 = Client([ws(gb.port)], user="p2", backoff_max=2.0)
    try:
        async with consumer, p1, p2:
            rc, r1, r2 = await consumer.join(room), await p1.join(room), await p2.join(room)
            start = rc.seq
            got: list[ChatMessage] = []
            gaps: list[NotRecovered] = []
            reader = asyncio.create_task(collect(rc, got, gaps))
            traffic = asyncio.gather(produce(r1, "p1", N, PACE), produce(r2, "p2", N, PACE))
            await asyncio.sleep(2.0)
            if fault == "gateway_kill_9":
                ga.kill()
            elif fault == "broker_kill_9_restart":
                fresh_nats.kill()
                await asyncio.sleep(1)
                fresh_nats.start()
            elif fault == "network_cut_10s":
                proxy.cut()
                await asyncio.sleep(10)
                proxy.restore()
            else:
                proxy.pause()
                await asyncio.sleep(10)
                proxy.resume()
            ended = time.monotonic()
            acks1, acks2 = await traffic
            acked_at = time.monotonic()
            stored = await stored_messages(fresh_nats.url, room)
            want = [m for m in stored if m["seq"] > (start or 0)]
            await wait_until(lambda: len(got) >= len(want), 90, f"{len(want)} messages")
            await asyncio.sleep(0.5)  # a late duplicate would show now
            reader.cancel()
            # Every send acked once, stored once.
            acks = acks1 + acks2
            assert len(acks) == 2 * N and len({a.id for a in acks}) == 2 * N
            assert all(a.seq is not None for a in acks)
            assert len(stored) == 2 * N
            assert len({m["text"] for m in stored}) == 2 * N, "a send was stored twice"
            assert {m["seq"] for m in stored} == {a.seq for a in acks}
            # The consumer: everything after its start, once, in the stream's order.
            assert gaps == []
            assert [(m.seq, m.text) for m in got] == [(m["seq"], m["text"]) for m in want]
            assert [m.prev for m in got[1:]] == [m.seq for m in got[:-1]]
            print(
                f"\n{fault}: {2 * N} sends, {len(acks)} acked once ({len(stored)} stored, none"
                f" twice); consumer got {len(got)}/{len(want)} in order, once"
                f" ({rc.duplicates} duplicates dropped, {rc.gaps} gaps healed);"
                f" reconnects: consumer {consumer.connects - 1}, p1 {p1.connects - 1},"
                f" p2 {p2.connects - 1}; resent sends: p1 {p1.resends}, p2 {p2.resends};"
                f" traffic done {acked_at - ended:.1f}s after the fault;"
                f" consumer now on {consumer.url}"
            )
            if fault == "gateway_kill_9":
                assert consumer.url == ws(gb.port) and p1.url == ws(gb.port)
    finally:
        await proxy.stop()
