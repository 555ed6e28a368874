"""The load generator: runs in its own process(es), never in a gateway's event loop.

Each message text is ``"<send time>|<seq>"`` (time.time()); a subscriber computes the latency
from it on receipt. ``kind`` is "roombus" (join frames, chat.message frames) or "baseline"
(room in the query string, raw text frames).
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def paced(rate: float, dur: float) -> AsyncIterator[tuple[int, str]]:
    """``(n, client_id)`` for each send of a step: ``rate`` per second for ``dur`` seconds,
    on schedule (late sends catch up). The ids are unique across steps (a reused id would be
    deduplicated as a retry)."""
    start = time.perf_counter()
    interval = 1.0 / rate
    n = 0
    while True:
        due = start + n * interval
        now = time.perf_counter()
        if now - start >= dur:
            return
        if due > now:
            await asyncio.sleep(due - now)
        yield n, f"{rate:g}-{start:.6f}-{n}"
        n += 1


async def answered(sent: int, answers: Callable[[], int], within: float = 10.0) -> None:
    """Until every send of a step is answered (ack or error), at most ``within`` seconds."""
    deadline = time.perf_counter() + within
    while answers() < sent and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def _open(kind: str, url: str, user: str, room: str) -> ClientConnection:
    if kind == "baseline":
        return await connect(f"{url}?room={room}", max_queue=None, ping_interval=None)
    ws = await connect(f"{url}?user={user}", max_queue=None, ping_interval=None)
    await ws.send(orjson.dumps({"type": "join", "data": {"room": room}}).decode())
    while True:
        f = orjson.loads(await ws.recv())
        if f["type"] == "joined" and f["data"]["room"] == room:
            return ws


async def _subscribers(
    kind: str, urls: list[str], rooms: list[str], ids: range, ready: Any, go: Any, dur: float
) -> dict[str, Any]:
    lat: list[float] = []
    socks = []
    for i in ids:
        # a room's subscribers alternate between the servers (subscriber i is in room
        # i mod len(rooms)), so every message is delivered on both: it crosses the bus
        server = urls[(i // len(rooms)) % len(urls)]
        socks.append(await _open(kind, server, f"s{i}", rooms[i % len(rooms)]))
    ready.set()

    async def reader(ws: ClientConnection) -> None:
        async for raw in ws:
            now = time.time()
            f = orjson.loads(raw)
            if f["type"] == "chat.message":
                lat.append(now - float(f["data"]["text"].split("|", 1)[0]))

    tasks = [asyncio.create_task(reader(ws)) for ws in socks]
    while not go.is_set():  # noqa: ASYNC110 - a multiprocessing Event
        await asyncio.sleep(0.05)
    cpu0 = time.process_time()
    await asyncio.sleep(dur + 2.0)  # drain time after the publishers stop
    for t in tasks:
        t.cancel()
    for ws in socks:
        await ws.close()
    # CPU while the publishers ran (and the drain after): near 1 s/s = this process is
    # the bottleneck, and its latencies include its own queueing.
    return {"latencies": lat, "cpu_s": time.process_time() - cpu0}


def subscriber_proc(kind, urls, rooms, ids, ready, go, dur, out) -> None:  # type: ignore[no-untyped-def]
    """The subscribers numbered ``ids`` (of all the step's subscribers, over processes)."""
    raise_nofile()
    out.put(asyncio.run(_subscribers(kind, urls, rooms, ids, ready, go, dur)))


async def _publishers(
    kind: str, urls: list[str], rooms: list[str], p: int, rate: float, dur: float, go: Any
) -> dict[str, Any]:
    pubs = []
    for i in range(p):
        pubs.append(await _open(kind, urls[i % len(urls)], f"p{i}", rooms[i % len(rooms)]))
    counts: dict[str, int] = {}
    drains = [asyncio.create_task(_drain(ws, counts)) for ws in pubs]
    go.set()
    cpu0 = time.process_time()
    sent = 0
    start = time.perf_counter()
    interval = 1.0 / rate
    while True:
        due = start + sent * interval
        now = time.perf_counter()
        if now - start >= dur:
            break
        if due > now:
            await asyncio.sleep(due - now)
        i = sent % p
        text = f"{time.time():.6f}|{sent}"
        if kind == "baseline":
            await pubs[i].send(text)
        else:
            room = rooms[i % len(rooms)]
            await pubs[i].send(
                orjson.dumps(
                    {"type": "chat.message", "data": {"room": room, "text": text}}
                ).decode()
            )
        sent += 1
    await asyncio.sleep(2.0)
    for t in drains:
        t.cancel()
    for ws in pubs:
        await ws.close()
    return {
        "sent": sent,
        "acks": counts.pop("ack", 0),
        "errors": counts,
        "cpu_s": time.process_time() - cpu0,
    }


async def _drain(ws: ClientConnection, counts: dict[str, int]) -> None:
    """Read what the server sends a publisher: count acks, and errors by code."""
    async for raw in ws:
        f = orjson.loads(raw)
        if f.get("type") == "ack":
            counts["ack"] = counts.get("ack", 0) + 1
        elif f.get("type") == "error":
            code = str(f.get("data", {}).get("code"))
            counts[code] = counts.get(code, 0) + 1


def publisher_proc(kind, urls, rooms, p, rate, dur, go, out) -> None:  # type: ignore[no-untyped-def]
    raise_nofile()
    out.put(asyncio.run(_publishers(kind, urls, rooms, p, rate, dur, go)))


async def _storers(url: str, p: int, rate: float, dur: float) -> dict[str, Any]:
    """Scenario (d): ``p`` connections send ``rate`` msgs/s, each with a client_id; the
    latency is send -> ``ack`` (sent by the gateway once a history replica stored it).

    Each connection sends to a room of its own (and gets its message back once, stored): the
    scenario measures the store path, not a 20-way fan-out of every message."""
    pubs = [await _open("roombus", url, f"w{i}", f"store{i}") for i in range(p)]
    sent_at: dict[str, float] = {}
    acked: list[float] = []
    errors: dict[str, int] = {}

    async def reader(ws: ClientConnection) -> None:
        async for raw in ws:
            now = time.perf_counter()
            f = orjson.loads(raw)
            if f["type"] == "ack":
                t0 = sent_at.get(f["data"]["client_id"])
                if t0 is not None:
                    acked.append(now - t0)
            elif f["type"] == "error":
                code = str(f["data"].get("code"))
                errors[code] = errors.get(code, 0) + 1

    readers = [asyncio.create_task(reader(ws)) for ws in pubs]
    sent = 0
    async for n, cid in paced(rate, dur):
        sent_at[cid] = time.perf_counter()
        data = {"room": f"store{n % p}", "text": f"stored {n}", "client_id": cid}
        await pubs[n % p].send(orjson.dumps({"type": "chat.message", "data": data}).decode())
        sent = n + 1
    await answered(sent, lambda: len(acked) + sum(errors.values()))
    for t in readers:
        t.cancel()
    for ws in pubs:
        await ws.close()
    return {"sent": sent, "ack_latencies": acked, "errors": errors}


def store_proc(url, p, rate, dur, out) -> None:  # type: ignore[no-untyped-def]
    raise_nofile()
    out.put(asyncio.run(_storers(url, p, rate, dur)))


async def _idle(kind: str, url: str, n: int, hold: Any, done: Any) -> int:
    socks = []
    sem = asyncio.Semaphore(50)
    errors = 0

    async def one(i: int) -> None:
        nonlocal errors
        async with sem:
            try:
                if kind == "baseline":
                    socks.append(await connect(f"{url}?room=idle{i % 100}", ping_interval=None))
                else:
                    ws = await connect(f"{url}?user=i{i}", ping_interval=None)
                    await ws.recv()  # hello
                    socks.append(ws)
            except Exception:  # noqa: BLE001 - counted, reported
                errors += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    hold.put(len(socks))
    while not done.is_set():  # noqa: ASYNC110 - a multiprocessing Event
        await asyncio.sleep(0.1)
    for ws in socks:
        await ws.close()
    return errors


def idle_proc(kind, url, n, hold, done) -> None:  # type: ignore[no-untyped-def]
    raise_nofile()
    hold.put(("errors", asyncio.run(_idle(kind, url, n, hold, done))))
