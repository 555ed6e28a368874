"""The NATS connection's ``flush`` as the services rely on it, against a real nats-server: its
round trip comes after every command sent before it — a subscription made a moment ago
included (nats-py's own flush writes its PING ahead of those)."""

from __future__ import annotations

import asyncio
from functools import partial

import nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from gateway.interest import SWITCH_OVERLAP
from services.bus import Nats
from tests.support.procs import NatsServer, until
from tests.support.tcpproxy import TcpProxy


def _commands(wire: bytes) -> list[bytes]:
    """The client's protocol lines (payloads skipped), in the order they went out."""
    out, i = [], 0
    while (end := wire.find(b"\r\n", i)) != -1:
        line = wire[i:end]
        out.append(line)
        i = end + 2
        if line.startswith((b"PUB ", b"HPUB ")):
            i += int(line.split()[-1]) + 2  # the payload (with headers) and its CRLF
    return out


async def _nothing(_msg: Msg) -> None:
    pass


def _at_least(got: list[int], n: int) -> bool:
    return len(got) >= n


def _handed_in(sub: Subscription, mark: int) -> bool:
    """``sub`` handed its callback every message it had received at ``mark``."""
    return sub.delivered - sub.pending_msgs >= mark


async def test_flush_comes_back_after_the_subscription_made_before_it(
    nats_server: NatsServer,
) -> None:
    proxy = await TcpProxy(nats_server.port, record=True).start()
    assert proxy.sent is not None
    nc = Nats()
    await nc.connect(proxy.url, allow_reconnect=False)
    try:
        for i in range(20):  # the first flush subscribes its own inbox; the rest reuse it
            subject = f"order.{i}"
            await nc.subscribe(subject, cb=_nothing)
            await nc.flush(5)
            written = _commands(bytes(proxy.sent))
            (sub,) = [n for n, c in enumerate(written) if c.startswith(f"SUB {subject} ".encode())]
            # What brought the round trip back was written after the SUB: the server had it.
            assert sub < len(written) - 1, f"flush {i} returned with the SUB as the last command"
    finally:
        await nc.close()
        await proxy.stop()


async def test_after_flush_the_new_subscription_takes_every_later_message(
    nats_server: NatsServer,
) -> None:
    """The ``SUBSCRIBE=auto`` switch's rule, over a stream of messages from another
    connection, switching 12 times between a wildcard and a subject of its own: once
    ``flush`` returns (and a short overlap later), whatever the old subscription had not
    received yet reaches the new one — nothing is lost. (Without the overlap about one run in
    60 lost a message even with this flush, and 9 in 10 with nats-py's own; the overlap hides
    the latter, so the wire test above is the one that catches it.)"""
    nc, pub = Nats(), await nats.connect(nats_server.url)
    await nc.connect(nats_server.url)
    got: list[int] = []
    stop = asyncio.Event()
    sent = 0

    async def stream() -> None:
        nonlocal sent
        while not stop.is_set():
            for _ in range(50):
                sent += 1
                await pub.publish("switch.x", str(sent).encode())
            await asyncio.sleep(0)

    async def on_msg(m: Msg) -> None:
        got.append(int(m.data))

    try:
        old = await nc.subscribe("switch.*", cb=on_msg)
        await nc.flush(5)
        publisher = asyncio.create_task(stream())
        for i in range(12):
            await until(partial(_at_least, got, len(got) + 100), 10, "100 more messages")
            new = await nc.subscribe("switch.x" if i % 2 == 0 else "switch.*", cb=on_msg)
            await nc.flush(5)
            # The server had the new subscription when it sent the flush back; a message it
            # matched against the old ones alone just before may still be on its way (the
            # publisher's routing races the SUB): both ways a moment longer.
            await asyncio.sleep(SWITCH_OVERLAP)
            await until(partial(_handed_in, old, old.delivered), 10, "the old queue taken in")
            await old.unsubscribe()
            old = new
        stop.set()
        await publisher
        await pub.flush()
        await until(lambda: bool(got) and max(got) == sent, 10, "the last message")
        seen = set(got)
        lost = sorted(set(range(1, sent + 1)) - seen)
        assert not lost, f"lost {len(lost)} of {sent}: {lost[:10]}"
    finally:
        await nc.close()
        await pub.close()


async def test_a_connection_that_flushed_drains_without_waiting_on_its_own_flush(
    nats_server: NatsServer,
) -> None:
    """nats-py's drain unsubscribes every subscription and flushes as it goes: a flush that
    waited for its message on a subscription being drained would hold every drain (and each
    service's shutdown) for the whole flush timeout."""
    nc = Nats()
    await nc.connect(nats_server.url)
    for i in range(3):
        await nc.subscribe(f"drain.{i}", cb=_nothing)
    await nc.flush(5)  # the flush's own subscription exists from here on
    loop = asyncio.get_running_loop()
    start = loop.time()
    await nc.drain()
    took = loop.time() - start
    assert nc.is_closed
    assert took < 5, f"drain took {took:.1f} s (the flush timeout is 10)"
