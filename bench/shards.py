"""``python -m bench.shards [--quick]``: acked stored messages/s with ``HISTORY_SHARDS=1`` vs
``HISTORY_SHARDS=3`` on a 3-node JetStream cluster, every stream R3 (issue 21).

For each shard count: a fresh 3-node cluster (``services.natsserver.NatsCluster``, as
``roombus up --nats-cluster 3`` runs it), two history replicas and two gateways with that
``HISTORY_SHARDS``; several sender connections (a spawned load-generator process) over many
rooms send with a ``client_id`` at a stepped rate (the ramp of ``python -m bench``: a step
passes with >= 99% acked and p99 <= 250 ms). Afterwards every message of every history stream
is read back and every ack is checked against it: the acked ``seq`` in the room's shard stream
holds the acked ``id`` on the room's subject.

JetStream places each R3 stream and elects its leader; nothing makes three shards' leaders
land on three different nodes (two may share one). Unless ``--as-placed``, the bench moves
shard ``p``'s leadership to node ``p`` (a leader step-down with a preferred peer, as
``nats stream cluster step-down --preferred`` does) and reports both placements.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nats
import orjson
from websockets.asyncio.client import ClientConnection, connect

from bench.__main__ import ROOT, Server, cpu_s, passes, pct, search_max, settle
from bench.loadgen import answered, paced, raise_nofile
from proto.shards import HistoryLayout
from services.natsserver import NatsCluster
from services.streamread import StreamReader
from tests.support.cluster import move_leader

GATEWAYS = 2
HISTORIES = 2


async def _open(url: str, user: str, rooms: list[str]) -> ClientConnection:
    """A connection that joined every room of ``rooms``."""
    ws = await connect(f"{url}?user={user}", max_queue=None, ping_interval=None)
    for room in rooms:
        await ws.send(orjson.dumps({"type": "join", "data": {"room": room}}).decode())
    waiting = set(rooms)
    while waiting:
        f = orjson.loads(await ws.recv())
        if f["type"] == "joined":
            waiting.discard(f["data"]["room"])
        elif f["type"] == "error":
            raise RuntimeError(f"join refused: {f['data']}")
    return ws


async def _senders(
    urls: list[str], senders: int, rooms: list[str], rate: float, dur: float
) -> dict[str, Any]:
    """``senders`` connections (over the gateways), each in its share of ``rooms``, send
    ``rate`` msgs/s in all with client_ids, round-robin over connections and their rooms.
    Returns what was sent and every ack as (room, id, seq, latency)."""
    mine = [rooms[i::senders] for i in range(senders)]
    conns = [await _open(urls[i % len(urls)], f"w{i}", mine[i]) for i in range(senders) if mine[i]]
    sent_at: dict[str, tuple[float, str]] = {}
    acks: list[tuple[str, str, int, float]] = []
    errors: dict[str, int] = {}

    async def reader(ws: ClientConnection) -> None:
        async for raw in ws:
            now = time.perf_counter()
            f = orjson.loads(raw)
            if f["type"] == "ack":
                sent = sent_at.get(f["data"].get("client_id", ""))
                if sent is not None:
                    acks.append((sent[1], f["data"]["id"], int(f["data"]["seq"]), now - sent[0]))
            elif f["type"] == "error":
                code = str(f["data"].get("code"))
                errors[code] = errors.get(code, 0) + 1

    readers = [asyncio.create_task(reader(ws)) for ws in conns]
    sent = 0
    async for n, cid in paced(rate, dur):
        i = n % len(conns)
        room = mine[i][(n // len(conns)) % len(mine[i])]
        sent_at[cid] = (time.perf_counter(), room)
        data = {"room": room, "text": f"stored {n}", "client_id": cid}
        await conns[i].send(orjson.dumps({"type": "chat.message", "data": data}).decode())
        sent = n + 1
    await answered(sent, lambda: len(acks) + sum(errors.values()))
    for t in readers:
        t.cancel()
    for ws in conns:
        await ws.close()
    return {"sent": sent, "acks": acks, "errors": errors}


def sender_proc(urls, senders, rooms, rate, dur, out) -> None:  # type: ignore[no-untyped-def]
    raise_nofile()
    out.put(asyncio.run(_senders(urls, senders, rooms, rate, dur)))


async def _stream_contents(url: str, layout: HistoryLayout) -> dict[tuple[str, int], Any]:
    """(stream, seq) -> (subject, id) of every message in every history stream.

    Read with batched direct gets (no consumer): a replica may answer a little behind the
    leader, so reads go on until the count the stream's info reports is reached."""
    nc = await nats.connect(url.split(","))
    out: dict[tuple[str, int], Any] = {}
    try:
        js = nc.jetstream(timeout=10)
        for p, stream in enumerate(layout.streams()):
            total = int((await js.stream_info(stream)).state.messages)
            reader = StreamReader(nc, stream, timeout=10)
            last, deadline = 0, time.monotonic() + 60
            while sum(1 for k in out if k[0] == stream) < total:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{stream}: could not read its {total} messages")
                rows, _more = await reader.after(layout.stream_subjects(p)[0], last, 1000)
                for row in rows:
                    out[stream, row.seq] = (row.subject, orjson.loads(row.data).get("id"))
                    last = row.seq
            await reader.stop()
    finally:
        await nc.close()
    return out


async def _leaders(url: str, layout: HistoryLayout) -> dict[str, str | None]:
    nc = await nats.connect(url.split(","))
    try:
        js = nc.jetstream(timeout=10)
        out: dict[str, str | None] = {}
        for stream in layout.streams():
            info = await js.stream_info(stream)
            out[stream] = info.cluster.leader if info.cluster is not None else None
        return out
    finally:
        await nc.close()


def check_acks(
    layout: HistoryLayout, acks: list[tuple[str, str, int, float]], stored: dict[Any, Any]
) -> dict[str, int]:
    """Every ack against the streams: its seq, in the room's shard stream, holds its id on
    the room's subject."""
    wrong = missing = 0
    for room, msg_id, seq, _lat in acks:
        found = stored.get((layout.room_stream(room), seq))
        if found is None:
            missing += 1
        elif found != (layout.room_subject(room), msg_id):
            wrong += 1
    return {"acks_checked": len(acks), "acks_missing": missing, "acks_wrong": wrong}


def run_shards(
    shards: int,
    rates: Sequence[float],
    dur: float,
    tmp: Path,
    senders: int = 24,
    rooms: int = 96,
    spread: bool = True,
) -> dict[str, Any]:
    """The ramp for one shard count on a fresh 3-node cluster, every ack checked after."""
    layout = HistoryLayout(shards)
    cluster = NatsCluster(base_dir=tmp / f"cluster-k{shards}", size=3).start(timeout=60)
    env = {
        "HISTORY_SHARDS": str(shards),
        "HISTORY_REPLICAS": "3",
        "PRESENCE_REPLICAS": "3",
        "HISTORY_MAX_BYTES": str(256 * 1024**2),
    }
    procs: list[Server] = []
    all_acks: list[tuple[str, str, int, float]] = []
    room_names = [f"k{shards}room{i}" for i in range(rooms)]
    try:
        history = [Server("history", cluster.url, tmp, env) for _ in range(HISTORIES)]
        procs += history
        gateways = [Server("roombus", cluster.url, tmp, env) for _ in range(GATEWAYS)]
        procs += gateways
        placed = leaders = asyncio.run(_leaders(cluster.url, layout))
        if spread and 1 < shards <= len(cluster.nodes):
            # One leader per node, whatever JetStream's placement chose (it may put two on
            # one node): the layout a shard count is meant to give.
            for p, stream in enumerate(layout.streams()):
                asyncio.run(move_leader(cluster.url, stream, cluster.nodes[p].name))
            leaders = asyncio.run(_leaders(cluster.url, layout))
        print(f"  K={shards}: stream leaders {leaders} (placed: {placed})", flush=True)

        def run(rate: float) -> dict[str, Any]:
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            h0 = sum(cpu_s(h.proc.pid) for h in history)
            g0 = sum(cpu_s(g.proc.pid) for g in gateways)
            urls = [g.url for g in gateways]
            p = ctx.Process(target=sender_proc, args=(urls, senders, room_names, rate, dur, out))
            p.start()
            res = out.get(timeout=dur + 300)
            p.join(10)
            h1 = sum(cpu_s(h.proc.pid) for h in history)
            g1 = sum(cpu_s(g.proc.pid) for g in gateways)
            all_acks.extend(res["acks"])
            lat = [a[3] for a in res["acks"]]
            sent = res["sent"]
            st = {
                "rate": rate,
                "sent": sent,
                "acked": len(lat),
                "acked_per_s": len(lat) / dur,
                "ack_ratio": len(lat) / sent if sent else 0.0,
                "p50_ms": pct(lat, 0.5) * 1000,
                "p99_ms": pct(lat, 0.99) * 1000,
                "errors": res["errors"],
                "history_cpu_s_per_1k": (h1 - h0) / len(lat) * 1e3 if lat else float("nan"),
                "gateway_cpu_s_per_1k": (g1 - g0) / len(lat) * 1e3 if lat else float("nan"),
            }
            print(
                f"  K={shards} rate {rate:6.0f}/s -> {st['acked_per_s']:7.0f} acked/s "
                f"ratio {st['ack_ratio']:.3f} p50 {st['p50_ms']:.1f} p99 {st['p99_ms']:.1f} ms "
                f"history cpu/1k {st['history_cpu_s_per_1k']:.2f}s errors {st['errors']}",
                flush=True,
            )
            return st

        steps, best = search_max(
            run,
            lambda st: passes(st["ack_ratio"], st["p99_ms"]),
            rates,
            lambda: settle([x.proc.pid for x in procs]),
        )
        stored = asyncio.run(_stream_contents(cluster.url, layout))
        checked = check_acks(layout, all_acks, stored)
        per_stream = {s: sum(1 for k in stored if k[0] == s) for s in layout.streams()}
        print(f"  K={shards}: {checked}, stored per stream {per_stream}", flush=True)
    finally:
        for x in procs:
            x.stop()
        cluster.stop()
    return {
        "shards": shards,
        "senders": senders,
        "rooms": rooms,
        "leaders": leaders,
        "leaders_placed": placed,
        "steps": steps,
        "max_ok": best,
        "acked_total": len(all_acks),
        "stored_total": len(stored),
        "stored_per_stream": per_stream,
        **checked,
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.shards")
    ap.add_argument("--quick", action="store_true", help="short steps, fewer rates")
    ap.add_argument("--shards", default="1,3", help="shard counts to compare (default: 1,3)")
    ap.add_argument(
        "--as-placed",
        action="store_true",
        help="keep the stream leaders where JetStream placed them (default: one per node)",
    )
    a = ap.parse_args()
    raise_nofile()
    dur = 2.0 if a.quick else 5.0
    rates = [200, 400] if a.quick else [500, 1000, 2000, 3000, 4000, 6000, 8000]
    senders, rooms = (8, 24) if a.quick else (24, 96)
    tmp = Path(tempfile.mkdtemp(prefix="roombus-bench-shards-"))
    results: dict[str, Any] = {
        "quick": a.quick,
        "duration_s": dur,
        "started": time.time(),
        "cpus": os.cpu_count(),
        "cluster": "3 nats-server nodes, every stream R3",
        "processes": {"gateways": GATEWAYS, "history": HISTORIES},
        "runs": {},
    }
    for shards in (int(k) for k in a.shards.split(",")):
        print(f"HISTORY_SHARDS={shards}: {senders} senders over {rooms} rooms", flush=True)
        results["runs"][f"k{shards}"] = run_shards(
            shards, rates, dur, tmp, senders, rooms, spread=not a.as_placed
        )
    out = ROOT / "bench" / "results" / f"shards-{'quick' if a.quick else 'full'}.json"
    out.write_text(json.dumps(results, indent=2))
    for key, run in results["runs"].items():
        best = run["max_ok"] or {}
        print(
            f"{key}: max ok {best.get('acked_per_s', float('nan')):.0f} acked/s "
            f"(p99 {best.get('p99_ms', float('nan')):.1f} ms); acks checked "
            f"{run['acks_checked']}, missing {run['acks_missing']}, wrong {run['acks_wrong']}; "
            f"leaders {run['leaders']}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
