"""``python -m bench.interest [--quick]``: what interest-based subscriptions (``SUBSCRIBE``,
issue 21) cost and save, measured in one run.

Four gateways, 2,000 rooms and a fixed total publish rate, published straight to NATS (the
publisher is a member of no room, so it subscribes no gateway to anything); one history
replica stores every message and the stream republishes it to the gateways. Each layout runs
once with ``SUBSCRIBE=wildcard`` and once with ``SUBSCRIBE=rooms`` (fresh gateways per mode):

- ``disjoint``: each room's members are on exactly one gateway (room i on gateway i mod 4);
- ``shared``: each room's members are on every gateway (where the wildcards should win);
- ``churn``: ``disjoint`` plus, on every gateway, connections that join and leave rooms whose
  members are on the other gateways (so a join is that room's first local member) at
  ``--churn`` joins+leaves per second per gateway; also with ``SUBSCRIBE_LINGER=0`` (every
  such join subscribes, every leave unsubscribes).

Per gateway: CPU seconds over the measured window (utime+stime of /proc/<pid>/stat, from the
first publish to the end of the drain) and the stored messages it received (its
``roombus_gateway_bus_messages_total{kind="room_message"}``); per phase: frames delivered/s,
the share delivered, latency, and for churn the p50/p99 join latency (``join`` sent ->
``joined``) and the CPU added to the same mode's ``disjoint`` phase.
Results: ``bench/results/interest.json`` (``interest-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.__main__ import cpu_s, pct, settle
from bench.interest_loadgen import churn_proc, member_proc, publisher_proc
from bench.loadgen import raise_nofile
from services.natsserver import NatsServer
from services.ports import free_port
from tests.support.procs import scrape_metric

ROOT = Path(__file__).resolve().parent.parent
MEMBER_PROCS = 2


@dataclass(frozen=True)
class Size:
    gateways: int
    rooms: int
    rate: float
    """Messages per second, all rooms together (each room gets rate / rooms)."""
    duration: float
    churn: float
    """Joins + leaves per second per gateway in the churn phases."""
    conns: int
    """Member connections per gateway (and churn connections per gateway)."""
    drain: float
    """Seconds the members keep reading after the last publish."""


FULL = Size(gateways=4, rooms=2000, rate=1000, duration=10, churn=500, conns=10, drain=2)
QUICK = Size(gateways=4, rooms=200, rate=200, duration=2, churn=50, conns=4, drain=1)


class Proc:
    """``roombus <service>`` as a child process on a free port."""

    def __init__(self, service: str, nats_url: str, env: dict[str, str], logdir: Path) -> None:
        self.service, self.port = service, free_port()
        self.http = f"http://127.0.0.1:{self.port}"
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.log = (logdir / f"{service}-{self.port}.log").open("ab")
        full_env = {
            **os.environ,
            "NATS_URL": nats_url,
            "LOG_LEVEL": "warning",
            "PORT": str(self.port),
            "MAX_CONNECTIONS_PER_IP": "20000",
            "MAX_PENDING_PER_IP": "20000",
            "RATE_LIMIT": "100000",
            "RATE_BURST": "100000",
            "MAX_ROOMS": "10000",
            **env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", service],
            cwd=ROOT,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=raise_nofile,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.service} exited; see {self.log.name}")
            try:
                if httpx.get(f"{self.http}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.service} on :{self.port} not ready in {timeout}s")

    def metric(self, name: str, labels: str = "") -> float:
        return scrape_metric(self.http, name, labels, timeout=10)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def _received(g: Proc) -> float:
    return g.metric("roombus_gateway_bus_messages_total", 'kind="room_message"')


def _split(rooms: list[str], n: int) -> list[list[str]]:
    return [rooms[i::n] for i in range(n) if rooms[i::n]]


def run_phase(
    size: Size,
    gws: list[Proc],
    others: dict[str, int],
    nats_url: str,
    layout: str,
    churn: bool,
    tag: str,
) -> dict[str, Any]:
    """One measured window: members joined, then ``size.rate`` msgs/s for ``size.duration`` s
    (and the churn, when asked)."""
    g_n = len(gws)
    rooms = [f"{tag}-{i}" for i in range(size.rooms)]
    local = [
        rooms[g::g_n] if layout in ("disjoint", "churn") else rooms for g in range(g_n)
    ]  # the rooms whose members are on gateway g
    plan = [
        (gw.url, f"m{g}-{k}", part)
        for g, gw in enumerate(gws)
        for k, part in enumerate(_split(local[g], size.conns))
    ]
    ctx = mp.get_context("spawn")
    go, out_m, out_p, out_c = ctx.Event(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs, readies = [], []
    for k in range(MEMBER_PROCS):
        ready = ctx.Event()
        args = (plan[k::MEMBER_PROCS], ready, go, size.duration, size.drain, out_m)
        procs.append(ctx.Process(target=member_proc, args=args))
        readies.append(ready)
    churn_plan: list[tuple[str, str, list[str]]] = []
    cycle = 0.0
    if churn:
        # Rooms whose members are all on other gateways: a churn join is the first here.
        elsewhere = [[r for r in rooms if r not in set(local[g])] for g in range(g_n)]
        churn_plan = [
            (gw.url, f"c{g}-{k}", elsewhere[g][k :: size.conns])
            for g, gw in enumerate(gws)
            for k in range(size.conns)
        ]
        cycle = 2 * size.conns / size.churn  # a join and a leave per connection per cycle
        ready = ctx.Event()
        procs.append(
            ctx.Process(
                target=churn_proc, args=(churn_plan, cycle, ready, go, size.duration, out_c)
            )
        )
        readies.append(ready)
    for p in procs:
        p.start()
    if not all(r.wait(600) for r in readies):
        raise RuntimeError("members did not join")
    received0 = [_received(g) for g in gws]
    subscribes0 = [g.metric("roombus_gateway_room_subscribes_total") for g in gws]
    pub = ctx.Process(
        target=publisher_proc, args=(nats_url, rooms, size.rate, size.duration, go, out_p)
    )
    pub.start()
    if not go.wait(120):
        raise RuntimeError("the publisher did not start")
    t0 = time.monotonic()
    cpu0 = [cpu_s(g.proc.pid) for g in gws]
    other0 = {name: cpu_s(pid) for name, pid in others.items()}
    sent = out_p.get(timeout=size.duration + 120)
    parts = [out_m.get(timeout=size.duration + 300) for _ in range(MEMBER_PROCS)]
    churned = out_c.get(timeout=size.duration + 300) if churn else None
    window = time.monotonic() - t0
    cpu1 = [cpu_s(g.proc.pid) for g in gws]
    other1 = {name: cpu_s(pid) for name, pid in others.items()}
    for p in [pub, *procs]:
        p.join(30)
    lat = [x for part in parts for x in part["latencies"]]
    per_room = 1 if layout in ("disjoint", "churn") else g_n
    expected = sent * per_room
    result: dict[str, Any] = {
        "layout": layout,
        "sent": sent,
        "window_s": round(window, 2),
        "expected": expected,
        "delivered": len(lat),
        "delivered_per_s": len(lat) / size.duration,
        "delivery_ratio": len(lat) / expected if expected else 0.0,
        "p50_ms": pct(lat, 0.5) * 1000,
        "p99_ms": pct(lat, 0.99) * 1000,
        "gateway_cpu_s": [round(b - a, 3) for a, b in zip(cpu0, cpu1, strict=True)],
        "gateway_received": [_received(g) - r0 for g, r0 in zip(gws, received0, strict=True)],
        "room_subscribes": [
            g.metric("roombus_gateway_room_subscribes_total") - s0
            for g, s0 in zip(gws, subscribes0, strict=True)
        ],
        "other_cpu_s": {k: round(other1[k] - other0[k], 3) for k in others},
        "loadgen_cpu_s": {"members": round(max(p["cpu_s"] for p in parts), 2)},
    }
    result["gateway_cpu_s_total"] = round(sum(result["gateway_cpu_s"]), 3)
    if churned is not None:
        joins = churned["join_latencies"]
        result.update(
            {
                "churn_ops_per_s_per_gateway": 2 * len(joins) / size.duration / g_n,
                "joins": len(joins),
                "join_errors": churned["errors"],
                "join_p50_ms": pct(joins, 0.5) * 1000,
                "join_p99_ms": pct(joins, 0.99) * 1000,
            }
        )
        result["loadgen_cpu_s"]["churn"] = round(churned["cpu_s"], 2)
    return result


def _line(mode: str, r: dict[str, Any]) -> str:
    cpu = " ".join(f"{c:5.2f}" for c in r["gateway_cpu_s"])
    recv = " ".join(f"{x:6.0f}" for x in r["gateway_received"])
    text = (
        f"  {r['layout']:8} {mode:13} sent {r['sent']:6} deliv/s {r['delivered_per_s']:7.0f}"
        f" ratio {r['delivery_ratio']:.3f} p99 {r['p99_ms']:6.1f} ms | gateway cpu s [{cpu}]"
        f" = {r['gateway_cpu_s_total']:5.2f} | stored msgs received [{recv}]"
    )
    if "joins" in r:
        text += (
            f" | {r['churn_ops_per_s_per_gateway']:.0f} joins+leaves/s/gw, join p50"
            f" {r['join_p50_ms']:.1f} p99 {r['join_p99_ms']:.1f} ms,"
            f" {sum(r['room_subscribes']):.0f} room subscriptions made,"
            f" {r['join_errors']} errors"
        )
    return text


MODES: list[tuple[str, dict[str, str], tuple[str, ...]]] = [
    ("wildcard", {"SUBSCRIBE": "wildcard"}, ("disjoint", "shared", "churn")),
    ("rooms", {"SUBSCRIBE": "rooms"}, ("disjoint", "shared", "churn")),
    ("rooms-linger0", {"SUBSCRIBE": "rooms", "SUBSCRIBE_LINGER": "0"}, ("churn",)),
]


def run(size: Size, tmp: Path) -> dict[str, Any]:
    """Every phase of every mode; returns the results (also printed as they come)."""
    nats = NatsServer(store_dir=tmp / "nats").start()
    history: Proc | None = None
    results: dict[str, Any] = {
        "size": size.__dict__,
        "cpus": os.cpu_count(),
        "started": time.time(),
        "phases": {},
    }
    try:
        history = Proc("history", nats.url, {}, tmp)
        history.wait_ready()
        assert nats.proc is not None
        others = {"history": history.proc.pid, "nats-server": nats.proc.pid}
        for mode, env, layouts in MODES:
            gws = [Proc("gateway", nats.url, env, tmp) for _ in range(size.gateways)]
            try:
                for g in gws:
                    g.wait_ready()
                for layout in layouts:
                    settle([g.proc.pid for g in gws] + list(others.values()))
                    r = run_phase(
                        size,
                        gws,
                        others,
                        nats.url,
                        "disjoint" if layout == "churn" else layout,
                        layout == "churn",
                        f"{mode}-{layout}",
                    )
                    r["layout"] = layout
                    print(_line(mode, r), flush=True)
                    results["phases"].setdefault(layout, {})[mode] = r
            finally:
                for g in gws:
                    g.stop()
    finally:
        if history is not None:
            history.stop()
        nats.stop()
    for mode, r in results["phases"].get("churn", {}).items():
        base = results["phases"].get("disjoint", {}).get(mode.split("-")[0])
        if base is not None:
            r["added_gateway_cpu_s"] = round(
                r["gateway_cpu_s_total"] - base["gateway_cpu_s_total"], 3
            )
    return results


def summary(results: dict[str, Any]) -> str:
    lines = ["layout    mode           gateway CPU s  deliv/s  p99 ms  join p99 ms  added CPU s"]
    for layout, modes in results["phases"].items():
        for mode, r in modes.items():
            join = f"{r['join_p99_ms']:11.1f}" if "join_p99_ms" in r else " " * 11
            added = f"{r['added_gateway_cpu_s']:11.2f}" if "added_gateway_cpu_s" in r else ""
            lines.append(
                f"{layout:9} {mode:14} {r['gateway_cpu_s_total']:13.2f}"
                f" {r['delivered_per_s']:8.0f} {r['p99_ms']:7.1f} {join} {added}"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.interest", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    ap.add_argument("--rate", type=float, help="total msgs/s (default 1000; quick 200)")
    ap.add_argument("--rooms", type=int, help="rooms (default 2000; quick 200)")
    ap.add_argument("--duration", type=float, help="seconds per phase (default 10; quick 2)")
    ap.add_argument("--churn", type=float, help="joins+leaves/s per gateway (default 500)")
    ap.add_argument("--out", type=Path, help="results file (default bench/results/...)")
    a = ap.parse_args()
    raise_nofile()
    size = QUICK if a.quick else FULL
    size = Size(
        gateways=size.gateways,
        rooms=a.rooms or size.rooms,
        rate=a.rate or size.rate,
        duration=a.duration or size.duration,
        churn=a.churn or size.churn,
        conns=size.conns,
        drain=size.drain,
    )
    print(f"interest-based subscriptions: {size}", flush=True)
    results = run(size, Path(tempfile.mkdtemp(prefix="roombus-bench-interest-")))
    print(summary(results))
    out = a.out or ROOT / "bench" / "results" / (
        "interest-quick.json" if a.quick else "interest.json"
    )
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
