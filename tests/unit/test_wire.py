"""The fan-out's pre-built WebSocket frames are what a standard client parses."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gateway.wire import text_frame


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
