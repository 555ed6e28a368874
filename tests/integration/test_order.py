"""The one order, as an invariant under traffic and faults: every receiver sees each stored
message of its room once, in stream order, with unbroken ``prev`` links — even when the broker
restarts or a gateway is cut off from NATS while its clients stay connected."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import ServiceFactory
from tests.integration.test_history import assert_one_order
from tests.support.client import Client
from tests.support.procs import NatsServer, ServiceProc
from tests.support.stored import stored_messages
from tests.support.tcpproxy import TcpProxy


class Sender:
    """A careful client: every message has a client_id; refused ones are sent again."""

    def __init__(self, client: Client, room: str) -> None:
        self.c, self.room = client, room
        self.sent: list[str] = []

    async def run(self, n: int, pace: float = 0.0) -> None:
        for i in range(n):
            cid = f"{self.c.user}-{i}"
            self.sent.append(cid)
            await self.c.send("chat.message", room=self.room, text=cid, client_id=cid)
            if pace:
                await asyncio.sleep(pace)
            elif i % 100 == 99:
                await self.c.wait(lambda _, k=i - 80: len(self.acked()) >= k, 60, "acks")

    def acked(self) -> set[str]:
        return {a["data"]["client_id"] for a in self.c.of("ack")}

    async def settle(self, timeout: float = 90) -> None:
        """Resend whatever was refused until every message is acked."""
        deadline = time.monotonic() + timeout
        while True:
            missing = [cid for cid in self.sent if cid not in self.acked()]
            if not missing:
                return
            assert time.monotonic() < deadline, f"{self.c.user}: {len(missing)} never acked"
            refused = {e["data"].get("client_id") for e in self.c.of("error")}
            for cid in missing:
                if cid in refused:
                    await self.c.send("chat.message", room=self.room, text=cid, client_id=cid)
            self.c.frames[:] = [f for f in self.c.frames if f["type"] != "error"]
            await asyncio.sleep(0.5)


async def _receivers(
    gateways: list[ServiceProc], rooms: list[str], per_room: int
) -> list[tuple[Client, str, int]]:
    out = []
    for r, room in enumerate(rooms):
        for i in range(per_room):
            g = gateways[(r + i) % len(gateways)]
            c = await Client.open(g.ws_url, f"recv-{r}-{i}")
            out.append((c, room, (await c.join(room))["data"]["seq"]))
    return out


async def _check(nats_url: str, receivers: list[tuple[Client, str, int]], total: int) -> int:
    stored = {room: await stored_messages(nats_url, room) for room in {r for _, r, _ in receivers}}
    assert sum(len(v) for v in stored.values()) == total
    for room, msgs in stored.items():
        assert len({m["text"] for m in msgs}) == len(msgs), f"{room}: a message stored twice"
    for c, room, start in receivers:
        want = sum(1 for m in stored[room] if m["seq"] > start)
        await c.wait(lambda _, c=c, room=room, w=want: len(c.texts(room)) >= w, 60, "all")
        assert c.closed is None, f"{c.user} lost its socket"
        assert_one_order(c, room, start, stored[room])
    return sum(len(c.texts(room)) for c, room, _ in receivers)


async def test_every_receiver_sees_the_stream_order_each_message_once(
    fresh_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    """3 gateways, 2 history replicas, 6 senders and 12 receivers over 3 rooms, 5,000 messages."""
    services("history", fresh_nats)
    services("history", fresh_nats)
    gws = [services("gateway", fresh_nats) for _ in range(3)]
    rooms = [f"{room}-{i}" for i in range(3)]
    receivers = await _receivers(gws, rooms, 4)
    senders = []
    for i in range(6):
        c = await Client.open(gws[i % 3].ws_url, f"send-{i}")
        await c.join(rooms[i % 3])
        senders.append(Sender(c, rooms[i % 3]))
    per = [834] * 5 + [5000 - 834 * 5]
    await asyncio.gather(*(s.run(n) for s, n in zip(senders, per, strict=True)))
    for s in senders:
        await s.settle()
    delivered = await _check(fresh_nats.url, receivers, 5000)
    print(f"one order: 5000 stored, {delivered} deliveries checked over 12 receivers")


@pytest.mark.slow
@pytest.mark.parametrize("subscribe", ["wildcard", "rooms"])
@pytest.mark.parametrize("fault", ["nats_sigterm", "nats_kill_9", "gateway_cut_5s"])
async def test_a_broker_blip_leaves_every_open_socket_with_every_message_once_in_order(
    fresh_nats: NatsServer, services: ServiceFactory, room: str, fault: str, subscribe: str
) -> None:
    proxy = await TcpProxy(fresh_nats.port).start()
    try:
        services("history", fresh_nats)
        services("history", fresh_nats)
        g_direct = services("gateway", fresh_nats, SUBSCRIBE=subscribe)
        # The proxy runs in this event loop: wait for the gateway without blocking it.
        g_cut = services("gateway", proxy.url, history=False, wait=False, SUBSCRIBE=subscribe)
        deadline = time.monotonic() + 30
        while not g_cut.ready():
            assert time.monotonic() < deadline, g_cut.log()
            await asyncio.sleep(0.1)
        rooms = [f"{room}-{i}" for i in range(2)]
        receivers = await _receivers([g_cut, g_direct], rooms, 4)
        senders = []
        for i in range(4):
            g = (g_direct, g_cut)[i % 2]
            c = await Client.open(g.ws_url, f"send-{i}")
            await c.join(rooms[i % 2])
            senders.append(Sender(c, rooms[i % 2]))
        traffic = asyncio.gather(*(s.run(300, pace=0.01) for s in senders))
        await asyncio.sleep(1.0)  # mid-traffic
        loop = asyncio.get_running_loop()
        if fault == "gateway_cut_5s":
            proxy.cut()
            await asyncio.sleep(5)
            proxy.restore()
        else:
            fresh_nats.kill() if fault == "nats_kill_9" else fresh_nats.stop()
            await asyncio.sleep(1)
            fresh_nats.start()
        restored = loop.time()
        await traffic
        for s in senders:
            await s.settle()
        # Heal time: a marker sent now reaches every receiver after all that came before.
        marker = Sender(senders[0].c, rooms[0])
        marker.sent = []
        await senders[0].c.send("chat.message", room=rooms[0], text="marker", client_id="mk")
        for c, r, _ in receivers:
            if r == rooms[0]:
                await c.wait_texts(["marker"], r, timeout=60)
        healed = loop.time() - restored
        delivered = await _check(fresh_nats.url, receivers, 1201)
        gaps = sum(g.metric("roombus_gateway_gaps_total") for g in (g_cut, g_direct))
        healed_n = sum(g.metric("roombus_gateway_healed_total") for g in (g_cut, g_direct))
        print(
            f"{fault}: 1201 stored, {delivered} deliveries in order; {gaps:.0f} gaps,"
            f" {healed_n:.0f} messages healed; all caught up {healed:.1f}s after the fault ended"
        )
    finally:
        await proxy.stop()
