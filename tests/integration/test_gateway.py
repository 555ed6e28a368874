"""Cross-process chat: real nats-server, real gateway processes, real WebSocket clients."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time

import httpx
import nats
import pytest

from proto.ids import is_id
from tests.conftest import ServiceFactory, Stack
from tests.support.client import Client
from tests.support.procs import NatsServer, wait_for


async def test_message_sent_on_one_gateway_reaches_clients_on_another(
    shared_stack: Stack, room: str
) -> None:
    g1, g2 = shared_stack.gateways
    clients = [await Client.open(g.ws_url, f"u{i}") for i, g in enumerate((g1, g2, g1, g2))]
    for c in clients:
        await c.join(room)
    await clients[0].send("chat.message", room=room, text="hello")
    await clients[1].send("chat.message", room=room, text="hi back")
    for c in clients:
        await c.wait_texts(["hello", "hi back"], room)
    # Once each, not twice, and with the id/ts made at the edge.
    for c in clients:
        assert sorted(c.texts(room)) == ["hello", "hi back"]
        msgs = c.of("chat.message")
        assert all(is_id(m["data"]["id"]) and m["data"]["ts"].endswith("Z") for m in msgs)
    ids = {m["data"]["id"] for c in clients for m in c.of("chat.message")}
    assert len(ids) == 2
    assert clients[0].of("chat.message", text="hello")[0]["data"]["user"] == "u0"


@pytest.mark.parametrize("protocol", ["websockets-sansio", "websockets"])
async def test_every_websocket_implementation_speaks_the_same_protocol(
    shared_stack: Stack, services: ServiceFactory, room: str, protocol: str
) -> None:
    """The default (`direct`: frames written straight to the socket) beside uvicorn's own
    implementations (every frame through ASGI): the same frames, both ways, long ones too."""
    fast = shared_stack.gateway
    other = services("gateway", shared_stack.nats, history=False, WS_PROTOCOL=protocol)
    a, b = await Client.open(fast.ws_url, "a"), await Client.open(other.ws_url, "b")
    await a.join(room)
    await b.join(room)
    long = "é" * 1500  # > 125 and > 2**8 bytes: the longer frame headers
    await a.send("chat.message", room=room, text="from direct")
    await b.send("chat.message", room=room, text=long)
    for c in (a, b):
        await c.wait_texts(["from direct", long], room)
        assert sorted(c.texts(room)) == sorted(["from direct", long])


async def test_rooms_are_isolated(shared_stack: Stack, room: str) -> None:
    g1, g2 = shared_stack.gateways
    a, b = await Client.open(g1.ws_url, "a"), await Client.open(g2.ws_url, "b")
    other = room + "x"
    await a.join(room)
    await b.join(other)
    await a.send("chat.message", room=room, text="only for room")
    await b.send("chat.message", room=other, text="only for other")
    await a.wait_texts(["only for room"])
    await b.wait_texts(["only for other"])
    # A marker sent after proves the earlier ones had their chance to (wrongly) arrive.
    await b.join(room)
    await a.send("chat.message", room=room, text="marker")
    await b.wait_texts(["marker"])
    await a.wait_texts(["marker"])
    assert a.texts() == ["only for room", "marker"]
    assert b.texts() == ["only for other", "marker"]


async def test_one_connection_in_several_rooms_and_leave(shared_stack: Stack, room: str) -> None:
    g = shared_stack.gateway
    multi, x, y = [await Client.open(g.ws_url, n) for n in ("multi", "x", "y")]
    rx, ry = room + "x", room + "y"
    await multi.join(rx)
    await multi.join(ry)
    await x.join(rx)
    await y.join(ry)
    await x.send("chat.message", room=rx, text="to x")
    await y.send("chat.message", room=ry, text="to y")
    await multi.wait_texts(["to x", "to y"])
    assert multi.texts(rx) == ["to x"] and multi.texts(ry) == ["to y"]
    await multi.send("leave", room=rx)
    await multi.next("left", room=rx)
    await x.send("chat.message", room=rx, text="after leave")
    await y.send("chat.message", room=ry, text="marker")
    await multi.wait_texts(["marker"])
    assert "after leave" not in multi.texts()
    await multi.send("chat.message", room=rx, text="not a member")
    await multi.error("not_joined")


async def test_seed_style_send_without_room(shared_stack: Stack, room: str) -> None:
    g = shared_stack.gateway
    c = await Client.open(g.ws_url, "seed")
    await c.send("chat.message", text="nowhere")
    await c.error("room_required")
    await c.join(room)
    await c.send("chat.message", text="seed style")
    await c.wait_texts(["seed style"], room)
    await c.join(room + "2")
    await c.send("chat.message", text="ambiguous")
    err = await c.error("room_required")
    assert "2 rooms" in err["data"]["message"]


async def test_hand_published_bus_message_reaches_clients(shared_stack: Stack, room: str) -> None:
    g1, g2 = shared_stack.gateways
    a, b = await Client.open(g1.ws_url, "a"), await Client.open(g2.ws_url, "b")
    await a.join(room)
    await b.join(room)
    nc = await nats.connect(shared_stack.nats.url)
    await nc.publish(f"room.{room}.message", b'{"user":"ops","text":"hi from ops"}')
    await nc.flush()
    for c in (a, b):
        await c.wait_texts(["hi from ops"])
        data = c.of("chat.message")[0]["data"]
        assert data["user"] == "ops" and is_id(data["id"]) and data["ts"]
    await nc.close()


async def test_malformed_bus_payload_is_dropped_and_gateway_keeps_serving(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    h = services("history", nats_server)
    g = services("gateway", nats_server)
    c = await Client.open(g.ws_url, "c")
    await c.join(room)
    nc = await nats.connect(nats_server.url)
    bad = [b"garbage", b"[]", b'{"user":"x"}', b'{"user":"a b","text":"x"}', b"\xff\xfe"]
    for payload in bad:
        await nc.publish(f"room.{room}.message", payload)
    # Written straight into the stream, past the history service: the gateway checks too.
    await nc.publish(f"history.{room}", b'{"id":"x","text":"half-formed"}')
    await nc.publish(f"room.{room}.message", b'{"user":"ops","text":"good one"}')
    await nc.flush()
    await c.wait_texts(["good one"])
    assert c.texts() == ["good one"]
    assert wait_for(
        lambda: h.metric("roombus_history_malformed_total") >= len(bad), 5, "malformed count"
    )
    assert g.metric("roombus_gateway_bus_malformed_total", 'kind="stored"') == 1
    # The history service logs the drop, and does not spam one line per bad payload.
    log = h.log()
    assert "dropped malformed bus message" in log
    assert log.count("dropped malformed bus message") < len(bad)
    await c.send("chat.message", room=room, text="still serving")
    await c.wait_texts(["still serving"])
    await nc.close()


def _raw_ws_that_never_reads(port: int, room: str) -> socket.socket:
    """A WebSocket client that joins a room and then never reads a byte."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a tiny window
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /ws?user=sloth HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    got = b""
    while b"hello" not in got:
        got += s.recv(4096)
    payload = f'{{"type":"join","data":{{"room":"{room}"}}}}'.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    while b"joined" not in got:
        got += s.recv(4096)
    return s  # from here on, nothing is read


async def test_client_that_never_reads_does_not_delay_the_others(
    shared_stack: Stack, services: ServiceFactory, room: str
) -> None:
    nats_server = shared_stack.nats  # the shared history service; the gateway is the test's own
    g = services("gateway", nats_server, history=False, SEND_QUEUE=200, SLOW_CLIENT_TIMEOUT=1)
    sloth = _raw_ws_that_never_reads(g.port, room)
    honest = await Client.open(g.ws_url, "honest")
    await honest.join(room)
    wait_for(lambda: g.metric("roombus_gateway_open_connections") == 2, 5, "two connections")
    nc = await nats.connect(nats_server.url)
    text = b"x" * 3000
    batch, batches = 100, 50  # 15 MB for the sloth: far past every buffer on the way
    for b in range(batches):
        for i in range(b * batch, (b + 1) * batch):
            await nc.publish(f"room.{room}.message", b'{"user":"ops","text":"%d %s"}' % (i, text))
        await nc.flush()
        # The honest reader gets each batch promptly although the sloth reads nothing.
        await honest.wait(lambda _, n=(b + 1) * batch: len(honest.texts()) >= n, 10, "batch")
    n = batch * batches
    assert [t.split()[0] for t in honest.texts()] == [str(i) for i in range(n)]
    # The sloth lost messages (counted) and was cut off.
    assert g.metric("roombus_gateway_dropped_total", 'reason="slow_client"') > 0
    for i in range(50):  # keep offering until the stuck time is over the limit
        await nc.publish(f"room.{room}.message", b'{"user":"ops","text":"late %d"}' % i)
        await nc.flush()
        if g.metric("roombus_gateway_slow_disconnects_total") >= 1:
            break
        await asyncio.sleep(0.1)
    assert g.metric("roombus_gateway_slow_disconnects_total") >= 1
    wait_for(lambda: g.metric("roombus_gateway_open_connections") == 1, 10, "sloth removed")
    await honest.send("chat.message", room=room, text="after sloth")
    await honest.wait_texts(["after sloth"])
    sloth.close()
    await nc.close()


async def test_gateway_resumes_fanout_after_nats_restarts(
    fresh_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    g1, g2 = services("gateway", fresh_nats), services("gateway", fresh_nats)
    a, b = await Client.open(g1.ws_url, "a"), await Client.open(g2.ws_url, "b")
    await a.join(room)
    await b.join(room)
    await a.send("chat.message", room=room, text="before")
    await b.wait_texts(["before"])
    fresh_nats.stop()
    wait_for(lambda: not g1.ready() and not g2.ready(), 15, "readyz to report NATS down")
    fresh_nats.start()  # same port, same store
    wait_for(lambda: g1.ready() and g2.ready(), 30, "gateways to reconnect")
    # Clients kept their WebSocket connections throughout.
    assert a.closed is None and b.closed is None
    await a.send("chat.message", room=room, text="after")
    await b.wait_texts(["after"], timeout=20)
    await b.send("chat.message", room=room, text="and back")
    await a.wait_texts(["and back"], timeout=20)


SHUTDOWN_TIMEOUT = 6.0
SHUTDOWN_MARGIN = 5.0
"""Past ``SHUTDOWN_TIMEOUT``: interpreter start-up of the signal handler, teardown after the
last phase, and a loaded 2-core machine's scheduling. Generous on purpose: the promise is
the deadline, not a figure (an SSE stream the gateway did not end would hold uvicorn's
connection wait; the old phases added up to ~2.25x the timeout)."""


async def test_sigterm_ends_sse_first_closes_websockets_with_1012_and_exits_0_in_time(
    shared_stack: Stack, services: ServiceFactory, room: str
) -> None:
    # A gateway of its own (it is stopped) beside the shared history service.
    g = services("gateway", shared_stack.nats, history=False, SHUTDOWN_TIMEOUT=SHUTDOWN_TIMEOUT)
    c = await Client.open(g.ws_url, "c")
    await c.join(room)
    joined = asyncio.Event()
    ended: list[str] = []

    async def sse() -> None:
        async with httpx.AsyncClient(timeout=SHUTDOWN_TIMEOUT * 3) as http:
            async with http.stream("GET", f"{g.http}/sse?rooms={room}&user=es") as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and '"joined"' in line:
                        joined.set()
        # The chunked body was terminated: the gateway ended the stream, uvicorn did not
        # cancel it (a cancelled stream breaks off and httpx raises instead).
        ended.append("clean")

    stream = asyncio.create_task(sse())
    await asyncio.wait_for(joined.wait(), 10)
    started = time.monotonic()
    code = await asyncio.to_thread(g.terminate, SHUTDOWN_TIMEOUT + 3 * SHUTDOWN_MARGIN)
    elapsed = time.monotonic() - started
    assert code == 0, g.log()
    assert elapsed < SHUTDOWN_TIMEOUT + SHUTDOWN_MARGIN, (elapsed, g.log())
    await asyncio.wait_for(stream, 10)
    assert ended == ["clean"]
    await c.wait(lambda _: c.closed is not None, 10, "close")
    assert c.closed is not None and c.closed.rcvd is not None
    assert c.closed.rcvd.code == 1012


@pytest.mark.parametrize("origin", ["https://evil.example", "null"])
async def test_cross_site_origin_is_refused_before_upgrade(
    shared_stack: Stack, origin: str
) -> None:
    from websockets.exceptions import InvalidStatus

    g = shared_stack.gateway
    with pytest.raises(InvalidStatus) as info:
        await Client.open(g.ws_url, "x", origin=origin)
    assert info.value.response.status_code == 403
    ok = await Client.open(g.ws_url, "y", origin=f"http://localhost:{g.port}")
    assert ok.hello is not None


async def test_ephemeral_rooms_fan_out_live_without_storage(
    fresh_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    """`EPHEMERAL_ROOMS=live-*`: never stored, acked at once, no seq, no history needed."""
    env = {"EPHEMERAL_ROOMS": "live-*"}
    g1 = services("gateway", fresh_nats, history=False, **env)
    g2 = services("gateway", fresh_nats, history=False, **env)
    live = f"live-{room}"
    a, b = await Client.open(g1.ws_url, "a"), await Client.open(g2.ws_url, "b")
    joined = await a.join(live)
    assert joined["data"]["ephemeral"] is True
    await b.join(live)
    await a.send("chat.message", room=live, text="score 1-0", client_id="e1")
    ack = (await a.next("ack", client_id="e1"))["data"]
    assert is_id(ack["id"]) and "seq" not in ack
    for c in (a, b):
        await c.wait_texts(["score 1-0"], live)
        msg = c.of("chat.message")[0]["data"]
        assert msg["id"] == ack["id"] and "seq" not in msg
    # Leaving and coming back: the raw subscription follows membership, one copy each.
    await b.send("leave", room=live)
    await b.next("left", room=live)
    await b.join(live)
    await a.send("chat.message", room=live, text="score 2-0")
    await b.wait_texts(["score 2-0"], live)
    await a.wait_texts(["score 2-0"], live)
    assert b.texts(live) == ["score 1-0", "score 2-0"] == a.texts(live)
    # A stored room on the same gateways still needs the history service: it says so.
    await a.send("join", room=room)
    err = await a.error("unavailable")
    assert err["data"]["frame"] == "join"
    nc = await nats.connect(fresh_nats.url)
    try:
        names = [s.config.name for s in await nc.jetstream().streams_info()]
    finally:
        await nc.close()
    assert "HISTORY" not in names  # nothing was stored anywhere
