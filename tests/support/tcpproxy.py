"""A TCP proxy on loopback that a test can cut: the link between one service and NATS."""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.procs import free_port


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; :meth:`cut` drops every connection and
    refuses new ones until :meth:`restore`; :meth:`pause` holds every byte (both ways, no
    close: a silent network) until :meth:`resume`."""

    def __init__(self, target_port: int, record: bool = False) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.cut_off = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.sent: bytearray | None = bytearray() if record else None
        """With ``record``: every byte the clients sent through the proxy, in order."""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._open |= {writer, up_w}

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bytearray | None
        ) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    await self._flowing.wait()
                    if record is not None:
                        record += data
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pump(reader, up_w, self.sent), pump(up_r, writer, None))
        self._open -= {writer, up_w}

    def cut(self) -> None:
        """Drop every connection through the proxy and refuse new ones."""
        self.cut_off = True
        for w in list(self._open):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._open.clear()

    def restore(self) -> None:
        self.cut_off = False

    def pause(self) -> None:
        """Stop forwarding (connections stay open, bytes wait): a silent network."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def stop(self) -> None:
        self.cut()
        self.resume()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
