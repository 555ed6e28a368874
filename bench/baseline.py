"""The bare baseline: a websockets server + one NATS wildcard subscription, no framework.

``ws://HOST:PORT/ws?room=R`` joins room R; a text frame from a client is published as is on
``room.R.message``; every bus message is wrapped once into a chat.message frame and written
to each local socket of that room. No validation, no auth, no history.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
from urllib.parse import parse_qs, urlsplit

import nats
import orjson
from nats.aio.msg import Msg
from websockets.asyncio.server import ServerConnection, serve


async def main(port: int, nats_url: str) -> None:
    rooms: dict[str, set[ServerConnection]] = {}
    nc = await nats.connect(nats_url)

    async def on_msg(msg: Msg) -> None:
        room = msg.subject.split(".")[1]
        local = rooms.get(room)
        if not local:
            return
        frame = orjson.dumps(
            {"type": "chat.message", "data": {"room": room, "text": msg.data.decode()}}
        ).decode()
        for ws in list(local):
            try:
                await ws.send(frame)
            except Exception:  # noqa: BLE001 - a closed socket is not the baseline's concern
                pass

    await nc.subscribe("room.*.message", cb=on_msg)

    async def handler(ws: ServerConnection) -> None:
        path = ws.request.path if ws.request else "/"
        room = parse_qs(urlsplit(path).query).get("room", ["lobby"])[0]
        rooms.setdefault(room, set()).add(ws)
        try:
            async for text in ws:
                await nc.publish(
                    f"room.{room}.message", text.encode() if isinstance(text, str) else text
                )
        finally:
            rooms[room].discard(ws)

    async with serve(handler, "127.0.0.1", port, max_queue=None, ping_interval=None):
        print("ready", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--nats-url", required=True)
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(a.port, a.nats_url))
