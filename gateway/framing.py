"""WebSocket framing without a socket: the bytes of a server-to-client text frame (RFC 6455
section 5.2), built once per fan-out and written as they are to every member's transport."""

from __future__ import annotations

import struct

_HEAD_SHORT = struct.Struct("!BB")
_HEAD_MEDIUM = struct.Struct("!BBH")
_HEAD_LONG = struct.Struct("!BBQ")


def text_frame(payload: bytes) -> bytes:
    """A final, unmasked text frame (server to client) carrying ``payload`` (UTF-8 JSON)."""
    n = len(payload)
    if n < 126:
        return _HEAD_SHORT.pack(0x81, n) + payload
    if n < 65536:
        return _HEAD_MEDIUM.pack(0x81, 126, n) + payload
    return _HEAD_LONG.pack(0x81, 127, n) + payload
