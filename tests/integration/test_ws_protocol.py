"""The WebSocket contract, run over every protocol the gateway can serve with (WS_PROTOCOL):
``direct`` (our fast path on uvicorn's sans-I/O protocol), ``websockets-sansio`` and
``websockets`` (uvicorn's own). One suite, parametrized, as uvicorn tests its protocols: the
handshake, fragmented client messages, ping/pong both ways, close codes both ways, 1007 and
1009, and a client that stops reading (bounded, then closed with 4008).

A real gateway process per protocol, driven by a byte-level client (tests/support/rawws.py):
these are sync tests, so its blocking socket reads block no event loop.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from tests.support.procs import NatsServer, ServiceProc, wait_for
from tests.support.rawws import BINARY, CONT, PING, PONG, TEXT, RawWs, accept_key

PROTOCOLS = ["direct", "websockets-sansio", "websockets"]
MAX_FRAME = 4096
SEND_QUEUE = 16
SLOW_CLIENT_TIMEOUT = 1.0
PING_INTERVAL = 1.0


@pytest.fixture(scope="module", params=PROTOCOLS)
def gateway(
    request: pytest.FixtureRequest,
    nats_server: NatsServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProc]:
    proc = ServiceProc(
        "gateway",
        env={
            "NATS_URL": nats_server.url,
            "WS_PROTOCOL": request.param,
            "MAX_FRAME_BYTES": str(MAX_FRAME),
            "SEND_QUEUE": str(SEND_QUEUE),
            "SLOW_CLIENT_TIMEOUT": str(SLOW_CLIENT_TIMEOUT),
            "WS_PING_INTERVAL": str(PING_INTERVAL),
            # Long enough that a client which stops reading (and so answers no ping) is
            # dropped as a slow client, not by the keepalive.
            "WS_PING_TIMEOUT": "60",
            "RATE_LIMIT": "100000",
            "RATE_BURST": "100000",
        },
        logdir=Path(tmp_path_factory.mktemp(f"ws-{request.param}")),
    ).start()
    yield proc
    assert proc.alive(), "the gateway died:\n" + proc.log()
    proc.kill()


def connect(gw: ServiceProc, user: str = "raw", **kw: object) -> RawWs:
    ws = RawWs(gw.port, f"/ws?user={user}", **kw)  # type: ignore[arg-type]
    assert ws.status == 101, ws.headers
    return ws


def frame(kind: str, **data: object) -> bytes:
    return json.dumps({"type": kind, "data": data}).encode()


def next_json(ws: RawWs) -> dict[str, object]:
    """The next text message (pings are answered on the way, as a client library does)."""
    while True:
        op, payload = ws.read_frame()
        if op == PING:
            ws.send_frame(PONG, payload)
        elif op == TEXT:
            got: dict[str, object] = json.loads(payload)
            return got
        else:
            raise AssertionError(f"unexpected frame {op:#x} {payload[:80]!r}")


def still_serves(ws: RawWs) -> None:
    """The connection answers a request (``subscribe`` needs no other service)."""
    event = "probe." + uuid.uuid4().hex[:8]
    ws.send_frame(TEXT, frame("subscribe", events=[event]))
    assert next_json(ws) == {"type": "subscribed", "data": {"events": [event]}}


def test_handshake_switches_protocols_with_the_accept_key_and_says_hello(
    gateway: ServiceProc,
) -> None:
    ws = connect(gateway, "shaker")
    assert ws.headers["upgrade"].lower() == "websocket"
    assert "upgrade" in ws.headers["connection"].lower()
    assert ws.headers["sec-websocket-accept"] == accept_key(ws.key)
    assert "sec-websocket-extensions" not in ws.headers  # no permessage-deflate
    assert next_json(ws) == {"type": "hello", "data": {"user": "shaker", "verified": False}}
    still_serves(ws)
    ws.close()


def test_a_request_that_is_not_a_websocket_handshake_is_not_upgraded(
    gateway: ServiceProc,
) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"  # no Sec-WebSocket-Key
        )
        status = int(s.recv(4096).split(b" ")[1])
    assert 400 <= status < 500


def test_a_fragmented_message_is_reassembled_with_a_ping_in_between(
    gateway: ServiceProc,
) -> None:
    ws = connect(gateway)
    next_json(ws)  # hello
    data = frame("subscribe", events=["frag.ment"])
    a, b, c = data[:5], data[5:20], data[20:]
    ws.send_frame(TEXT, a, fin=False)
    ws.send_frame(CONT, b, fin=False)
    ws.send_frame(PING, b"mid-message")  # control frames may come between fragments
    ws.send_frame(CONT, c, fin=True)
    assert ws.read_until(PONG) == b"mid-message"
    assert next_json(ws) == {"type": "subscribed", "data": {"events": ["frag.ment"]}}
    ws.close()


def test_a_client_ping_gets_a_pong_with_its_payload(gateway: ServiceProc) -> None:
    ws = connect(gateway)
    next_json(ws)
    for payload in (b"", b"p1", bytes(range(125))):
        ws.send_frame(PING, payload)
        assert ws.read_until(PONG) == payload
    still_serves(ws)
    ws.close()


def test_the_server_pings_and_a_pong_keeps_the_connection(gateway: ServiceProc) -> None:
    ws = connect(gateway, timeout=PING_INTERVAL * 10)
    next_json(ws)
    for _ in range(2):  # two keepalive rounds, each answered
        payload = ws.read_until(PING)
        ws.send_frame(PONG, payload)
    still_serves(ws)
    ws.close()


@pytest.mark.parametrize("code", [1000, 1001, 4000, 4999])
def test_a_client_close_is_answered_with_its_code_and_the_socket_ends(
    gateway: ServiceProc, code: int
) -> None:
    ws = connect(gateway)
    next_json(ws)
    ws.send_close(code, "bye")
    assert ws.close_code() == code
    assert ws.at_eof()
    ws.close()
    wait_for(lambda: gateway.metric("roombus_gateway_open_connections") == 0, 10, "connection gone")


def test_a_frame_over_max_frame_bytes_closes_with_1009(gateway: ServiceProc) -> None:
    ws = connect(gateway)
    next_json(ws)
    ws.send_frame(TEXT, b" " * (MAX_FRAME + 1))
    assert ws.close_code() == 1009
    ws.close()


def test_a_fragmented_message_over_max_frame_bytes_closes_with_1009(
    gateway: ServiceProc,
) -> None:
    ws = connect(gateway)
    next_json(ws)
    chunk = b" " * (MAX_FRAME // 2)  # every fragment fits; the message does not
    ws.send_frame(TEXT, chunk, fin=False)
    ws.send_frame(CONT, chunk, fin=False)
    ws.send_frame(CONT, chunk, fin=True)
    assert ws.close_code() == 1009
    ws.close()


def test_invalid_utf8_closes_with_1007(gateway: ServiceProc) -> None:
    ws = connect(gateway)
    next_json(ws)
    ws.send_frame(TEXT, b'{"type":"subscribe","data":{"events":["\xff"]}}')
    assert ws.close_code() == 1007
    ws.close()


def test_a_binary_frame_is_refused_and_the_connection_stays(gateway: ServiceProc) -> None:
    ws = connect(gateway)
    next_json(ws)
    ws.send_frame(BINARY, b"\x00\x01")
    err = next_json(ws)
    assert err["type"] == "error" and err["data"]["code"] == "bad_frame"  # type: ignore[index]
    still_serves(ws)
    ws.close()


async def _publish_until(url: str, subject: str, body: bytes, stop: object) -> int:
    """Publish ``body`` on ``subject`` (paced) until ``stop()``; bytes published."""
    nc = await nats.connect(url)
    sent = 0
    try:
        for i in range(100_000):
            await nc.publish(subject, body)
            sent += len(body)
            if i % 20 == 19:
                await nc.flush()
                if await asyncio.to_thread(stop):  # type: ignore[arg-type]
                    break
                await asyncio.sleep(0.01)
    finally:
        await nc.close()
    return sent


def test_a_client_that_stops_reading_is_bounded_then_closed_with_4008(
    gateway: ServiceProc, nats_server: NatsServer
) -> None:
    before = gateway.metric("roombus_gateway_slow_disconnects_total")
    kind = "bp." + uuid.uuid4().hex[:8]
    ws = connect(gateway, "sloth", rcvbuf=4096)
    next_json(ws)
    ws.send_frame(TEXT, frame("subscribe", events=[kind]))
    assert next_json(ws)["type"] == "subscribed"
    # From here on the client reads nothing while events pour in.
    body = json.dumps({"pad": "x" * 32_000}).encode()

    def disconnected() -> bool:
        return gateway.metric("roombus_gateway_slow_disconnects_total") > before

    published = asyncio.run(_publish_until(nats_server.url, f"event.{kind}", body, disconnected))
    assert disconnected(), "the gateway never gave up on a client that does not read"
    assert gateway.metric("roombus_gateway_dropped_total", 'reason="slow_client"') >= 1
    # Now read what the gateway did send: a bounded part of it (the rest was dropped, not
    # buffered), then the close frame with 4008 — or, where the gateway aborted the socket
    # (`direct`: a client that does not read is owed no close handshake), the reset.
    ws.sock.settimeout(30)
    try:
        code: int | None = ws.close_code()
    except ConnectionError:
        code = None
    print(f"published {published / 1e6:.1f} MB, the reader got {ws.received / 1e6:.1f} MB")
    assert code == 4008 or (code is None and gateway.env.get("WS_PROTOCOL", "direct") == "direct")
    # What reached the client is bounded by the send queue plus the socket buffers (the
    # kernel's send buffer autotunes up to 4 MB on Linux); measured: 3.4 MB of ~20 MB.
    assert ws.received < SEND_QUEUE * len(body) + 8_000_000
    assert ws.received < published  # the rest was dropped, not buffered
    ws.close()
    still = connect(gateway)
    next_json(still)
    still_serves(still)
    still.close()
