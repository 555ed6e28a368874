"""A byte-level WebSocket client, for frames no well-behaved library will send."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer to ``key`` (RFC 6455, 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


class RawWs:
    """One WebSocket over a plain blocking socket: every frame is built and parsed here.

    ``rcvbuf`` shrinks the socket's receive buffer (before connecting, so the window is
    small from the start): a client that stops reading then backs up the server quickly.
    """

    def __init__(
        self, port: int, path: str, *, rcvbuf: int | None = None, timeout: float = 10
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {self.key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
        }
        self.received = 0
        """Payload bytes read so far."""

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        return data

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        mask = os.urandom(4)
        n = len(payload)
        first = (0x80 if fin else 0) | opcode
        if n < 126:
            header = struct.pack("!BB", first, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", first, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", first, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send_close(self, code: int, reason: str = "") -> None:
        self.send_frame(CLOSE, struct.pack("!H", code) + reason.encode())

    def read_frame(self) -> tuple[int, bytes]:
        """The next frame's (opcode, payload)."""
        return self.read_frame_fin()[1:]

    def read_frame_fin(self) -> tuple[bool, int, bytes]:
        """The next frame's (fin, opcode, payload)."""
        while len(self.buf) < 2:
            self.buf += self._recv()
        fin, opcode, n = bool(self.buf[0] & 0x80), self.buf[0] & 0x0F, self.buf[1] & 0x7F
        offset = 2
        if n == 126:
            while len(self.buf) < 4:
                self.buf += self._recv()
            n, offset = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            while len(self.buf) < 10:
                self.buf += self._recv()
            n, offset = struct.unpack("!Q", self.buf[2:10])[0], 10
        while len(self.buf) < offset + n:
            self.buf += self._recv()
        payload, self.buf = self.buf[offset : offset + n], self.buf[offset + n :]
        self.received += n
        return fin, opcode, payload

    def read_until(self, opcode: int) -> bytes:
        """Read (and skip) frames until one with ``opcode``; its payload."""
        while True:
            op, payload = self.read_frame()
            if op == opcode:
                return payload

    def close_code(self) -> int:
        """Read frames until the server's close frame; its status code."""
        payload = self.read_until(CLOSE)
        return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else 1005

    def at_eof(self, timeout: float = 5.0) -> bool:
        """True when the server closed the TCP connection (nothing more to read)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except ConnectionResetError:
            return True
        except OSError:  # TimeoutError included: still open
            return False

    def close(self) -> None:
        self.sock.close()
