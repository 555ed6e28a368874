"""The load generators of ``python -m bench.interest``, each in a process of its own (spawned):
members that join many rooms on one connection and time what they receive, a publisher that
writes straight to NATS (it is a member of no room, so it subscribes no gateway to anything),
and churners that join and leave rooms at a fixed rate and time each ``join``.

Every text is ``"<send time>|<n>"`` (time.time()); latency = receive time - send time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from bench.loadgen import raise_nofile
from proto import subjects


async def _wait_go(go: Any) -> None:
    while not go.is_set():  # noqa: ASYNC110 - a multiprocessing Event
        await asyncio.sleep(0.02)


async def _member(url: str, user: str, rooms: list[str]) -> ClientConnection:
    """A connection in every one of ``rooms`` (the joins pipelined, answered in order)."""
    ws = await connect(f"{url}?user={user}", max_queue=None, ping_interval=None, max_size=None)
    for room in rooms:
        await ws.send(orjson.dumps({"type": "join", "data": {"room": room}}).decode())
    joined = 0
    while joined < len(rooms):
        f = orjson.loads(await ws.recv())
        if f["type"] == "joined":
            joined += 1
        elif f["type"] == "error":
            raise RuntimeError(f"{user}: join refused: {f['data']}")
    return ws


async def _members(
    plan: list[tuple[str, str, list[str]]], ready: Any, go: Any, dur: float, drain: float
) -> dict[str, Any]:
    socks = [await _member(url, user, rooms) for url, user, rooms in plan]
    ready.set()
    lat: list[float] = []

    async def reader(ws: ClientConnection) -> None:
        async for raw in ws:
            now = time.time()
            f = orjson.loads(raw)
            if f["type"] == "chat.message":
                lat.append(now - float(f["data"]["text"].split("|", 1)[0]))

    tasks = [asyncio.create_task(reader(ws)) for ws in socks]
    await _wait_go(go)
    cpu0 = time.process_time()
    await asyncio.sleep(dur + drain)  # what was published last still comes
    for t in tasks:
        t.cancel()
    for ws in socks:
        await ws.close()
    return {"latencies": lat, "cpu_s": time.process_time() - cpu0}


def member_proc(plan, ready, go, dur, drain, out) -> None:  # type: ignore[no-untyped-def]
    """Connections ``plan`` = [(url, user, rooms)]: ``ready`` once all joined, then reading
    for ``dur`` + ``drain`` s."""
    raise_nofile()
    out.put(asyncio.run(_members(plan, ready, go, dur, drain)))


async def _publish(nats_url: str, rooms: list[str], rate: float, dur: float, go: Any) -> int:
    import nats

    nc = await nats.connect(nats_url)
    subject = [subjects.room_message(r) for r in rooms]
    go.set()
    sent = 0
    start = time.perf_counter()
    interval = 1.0 / rate
    while True:
        now = time.perf_counter()
        if now - start >= dur:
            break
        due = start + sent * interval
        if due > now:
            await asyncio.sleep(due - now)
        text = f"{time.time():.6f}|{sent}"
        payload = orjson.dumps({"user": "bench", "text": text})
        await nc.publish(subject[sent % len(subject)], payload)
        sent += 1
    await nc.flush()
    await nc.close()
    return sent


def publisher_proc(nats_url, rooms, rate, dur, go, out) -> None:  # type: ignore[no-untyped-def]
    """``rate`` messages/s for ``dur`` s over ``rooms`` in turn, published to NATS."""
    out.put(asyncio.run(_publish(nats_url, rooms, rate, dur, go)))


async def _churn(
    plan: list[tuple[str, str, list[str]]], cycle: float, ready: Any, go: Any, dur: float
) -> dict[str, Any]:
    """Each connection: join a room, leave it half a ``cycle`` later, the next room at the
    next cycle (rooms in turn); every join is timed, send -> ``joined``."""
    socks = [
        await connect(f"{url}?user={user}", max_queue=None, ping_interval=None)
        for url, user, _ in plan
    ]
    for ws in socks:
        await ws.recv()  # hello
    ready.set()
    joins: list[float] = []
    errors = 0
    stop = False

    async def one(ws: ClientConnection, rooms: list[str], offset: float) -> None:
        nonlocal errors
        answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def reader() -> None:
            async for raw in ws:
                f = orjson.loads(raw)
                if f["type"] in ("joined", "left", "error"):
                    answers.put_nowait(f)

        async def answer(kind: str) -> bool:
            nonlocal errors
            while True:
                f = await answers.get()
                if f["type"] == kind:
                    return True
                if f["type"] == "error":
                    errors += 1
                    return False

        task = asyncio.create_task(reader())
        start = time.perf_counter() + offset
        i = 0
        while not stop:
            room = rooms[i % len(rooms)]
            due = start + i * cycle
            i += 1
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            t0 = time.perf_counter()
            await ws.send(orjson.dumps({"type": "join", "data": {"room": room}}).decode())
            if not await answer("joined"):
                continue
            joins.append(time.perf_counter() - t0)
            await asyncio.sleep(max(0.0, due + cycle / 2 - time.perf_counter()))
            await ws.send(orjson.dumps({"type": "leave", "data": {"room": room}}).decode())
            await answer("left")
        task.cancel()

    await _wait_go(go)
    cpu0 = time.process_time()
    n = len(socks)
    tasks = [
        asyncio.create_task(one(ws, rooms, cycle * k / n))
        for k, (ws, (_, _, rooms)) in enumerate(zip(socks, plan, strict=True))
    ]
    await asyncio.sleep(dur)
    stop = True
    await asyncio.wait(tasks, timeout=5)
    for ws in socks:
        await ws.close()
    return {"join_latencies": joins, "errors": errors, "cpu_s": time.process_time() - cpu0}


def churn_proc(plan, cycle, ready, go, dur, out) -> None:  # type: ignore[no-untyped-def]
    """Connections ``plan`` = [(url, user, rooms)] joining and leaving ``rooms`` in turn."""
    raise_nofile()
    out.put(asyncio.run(_churn(plan, cycle, ready, go, dur)))
