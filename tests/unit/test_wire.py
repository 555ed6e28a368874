"""The fan-out's pre-built WebSocket frames are what a standard client parses, and the
`direct` protocol refuses a uvicorn it was not tested on."""

from __future__ import annotations

from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gateway import main as gateway_main
from gateway.framing import text_frame
from gateway.settings import GatewaySettings
from gateway.wire import uvicorn_problem


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
def test_text_frame_parses_as_one_final_unmasked_text_frame(size: int) -> None:
    payload = ("é" * size).encode()[:size]
    payload = payload.decode("utf-8", "ignore").encode()  # whole characters only
    reader = StreamReader()
    reader.feed_data(text_frame(payload) + b"trailing")
    parser = Frame.parse(reader.read_exact, mask=False, max_size=None)
    with pytest.raises(StopIteration) as done:
        next(parser)
    frame = done.value.value
    assert frame.opcode is Opcode.TEXT and frame.fin
    assert bytes(frame.data) == payload
    assert reader.buffer == b"trailing"  # the header's length was exact


def test_the_installed_uvicorn_carries_the_direct_protocol() -> None:
    assert uvicorn_problem() is None


@pytest.mark.parametrize("version", ["0.53.9", "0.55.0", "1.0.0", "dev"])
def test_a_uvicorn_outside_the_pinned_range_is_refused_naming_the_range(version: str) -> None:
    problem = uvicorn_problem(version)
    assert problem is not None
    assert f"uvicorn {version} is outside the tested range" in problem
    assert "uvicorn>=0.54,<0.55" in problem and "WS_PROTOCOL=websockets-sansio" in problem


def test_a_uvicorn_protocol_without_the_attributes_we_use_is_refused() -> None:
    class Renamed(WebSocketsSansIOProtocol):
        def connection_made(self, transport: Any) -> None:  # sets `_transport` instead
            self._transport = transport

    problem = uvicorn_problem(uvicorn.__version__, Renamed)
    assert problem is not None and "connection_made() setting self.transport" in problem
    assert uvicorn_problem(uvicorn.__version__, object) is not None  # no such protocol


def test_a_uvicorn_protocol_with_a_method_named_like_ours_is_refused() -> None:
    class Flushing(WebSocketsSansIOProtocol):
        def flush(self) -> None:  # WireProtocol's sink method would shadow it
            pass

    problem = uvicorn_problem(uvicorn.__version__, Flushing)
    assert problem is not None and "has its own flush" in problem


def test_gateway_refuses_to_start_direct_on_an_unsupported_uvicorn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gateway_main, "uvicorn_problem", lambda: "uvicorn 9.9 is outside")
    with pytest.raises(SystemExit, match="roombus gateway: uvicorn 9.9 is outside"):
        gateway_main.run(GatewaySettings())
