"""``python -m bench.latency``: what "fan-out after storage" adds to a message's trip.

Two gateways, two history replicas, one nats-server (all local processes). A sender on one
gateway, a receiver on the other; the same paced traffic through a stored room and through an
ephemeral room (``EPHEMERAL_ROOMS``: fanned out from the raw publish, as every room was before
the one-order change). Prints p50/p99 of send -> receive for both, and the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from services.natsserver import NatsServer
from tests.support.client import Client
from tests.support.procs import ServiceProc


async def _trip(sender: Client, receiver: Client, room: str, n: int, rate: float) -> list[float]:
    sent: dict[str, float] = {}
    await sender.join(room)
    await receiver.join(room)
    for i in range(n):
        text = f"{room} {i}"
        sent[text] = time.perf_counter()
        await sender.send("chat.message", room=room, text=text, client_id=text)
        await asyncio.sleep(1 / rate)
    await receiver.wait(lambda _: len(receiver.texts(room)) >= n, 60, "all")
    return [t - sent[x] for x, t in zip(receiver.texts(room), receiver.arrived(room), strict=True)]


def _pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] * 1000


async def main(n: int, rate: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        nats = NatsServer(store_dir=Path(tmp) / "nats").start()
        env = {
            "NATS_URL": nats.url,
            "EPHEMERAL_ROOMS": "live-*",
            "LOG_LEVEL": "warning",
            "RATE_LIMIT": "100000",
            "RATE_BURST": "100000",
        }
        procs = [ServiceProc("history", env, Path(tmp) / "logs").start() for _ in range(2)]
        gws = [ServiceProc("gateway", env, Path(tmp) / "logs").start() for _ in range(2)]
        procs += gws
        try:
            sender = await Client.open(gws[0].ws_url, "sender")
            receiver = await Client.open(gws[1].ws_url, "receiver")
            await _trip(sender, receiver, "warmup", 50, rate)
            stored = await _trip(sender, receiver, "stored", n, rate)
            live = await _trip(sender, receiver, "live-x", n, rate)
            for name, xs in (("ephemeral (no storage)", live), ("stored (one order)", stored)):
                print(f"{name:24} p50 {_pct(xs, 50):6.2f} ms   p99 {_pct(xs, 99):6.2f} ms")
            print(
                f"{'added by storage':24} p50 {_pct(stored, 50) - _pct(live, 50):+6.2f} ms"
                f"   p99 {_pct(stored, 99) - _pct(live, 99):+6.2f} ms   ({n} msgs at {rate:g}/s)"
            )
            await sender.close()
            await receiver.close()
        finally:
            for p in procs:
                p.kill()
            nats.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=100.0)
    args = ap.parse_args()
    asyncio.run(main(args.n, args.rate))
