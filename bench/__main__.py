"""``python -m bench [--quick]``: roombus vs the bare baseline, same run, back to back."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import idle_proc, publisher_proc, raise_nofile, store_proc, subscriber_proc
from services.natsserver import NatsServer
from tests.support.procs import free_port

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
SUB_PROCS = 2  # subscriber processes per step
# Server kinds: the bare baseline, roombus as deployed (two history replicas store every
# message before the ack), roombus as a pure fan-out (EPHEMERAL_ROOMS=*, no history).
KINDS = ("baseline", "roombus", "fanout")
GATEWAYS = ("roombus", "fanout")
SERVICES = (*GATEWAYS, "history")  # our processes: `roombus <command>`, /readyz


def passes(ratio: float, p99_ms: float) -> bool:
    """A ramp step passes: >= 99% delivered (or acked) and p99 <= 250 ms."""
    return ratio >= 0.99 and p99_ms <= 250


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Server:
    def __init__(
        self, kind: str, nats_url: str, logdir: Path, extra: dict[str, str] | None = None
    ) -> None:
        self.kind, self.port = kind, free_port()
        env = {
            **os.environ,
            "NATS_URL": nats_url,
            "LOG_LEVEL": "warning",
            "PORT": str(self.port),
            "MAX_CONNECTIONS": "20000",
            "MAX_CONNECTIONS_PER_IP": "20000",
            "MAX_PENDING_PER_IP": "20000",
            "RATE_LIMIT": "100000",
            "RATE_BURST": "100000",
            **(extra or {}),
        }
        if kind == "fanout":
            # roombus as a pure fan-out: ephemeral rooms, no history service, acked at once.
            env["EPHEMERAL_ROOMS"] = "*"
        if kind in SERVICES:
            cmd = [
                sys.executable,
                "-m",
                "services.cli",
                "history" if kind == "history" else "gateway",
            ]
            cmd += ["--port", str(self.port)]
        else:
            cmd = [sys.executable, "-m", "bench.baseline", "--port", str(self.port)]
            cmd += ["--nats-url", nats_url]
        self.log = (logdir / f"{kind}-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=raise_nofile,
        )
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        deadline = time.time() + 30
        while time.time() < deadline:
            if self._ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{kind} did not start")

    def _ready(self) -> bool:
        if self.kind in SERVICES:
            try:
                r = httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1)
                return r.status_code == 200
            except httpx.HTTPError:
                return False
        import socket

        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_rate(
    servers: list[Server],
    rooms: list[str],
    subs: int,
    pubs: int,
    rate: float,
    dur: float,
    history: list[Server],
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    go, out_s, out_p = ctx.Event(), ctx.Queue(), ctx.Queue()
    kind, urls = servers[0].kind, [s.url for s in servers]
    # Subscribers over SUB_PROCS processes: one Python process reading 50k frames/s would
    # queue them itself and add its own delay to every latency.
    sps, readies = [], []
    for k in range(SUB_PROCS):
        ready = ctx.Event()
        ids = range(k, subs, SUB_PROCS)
        args = (kind, urls, rooms, ids, ready, go, dur, out_s)
        sps.append(ctx.Process(target=subscriber_proc, args=args))
        sps[-1].start()
        readies.append(ready)
    if not all(r.wait(120) for r in readies):
        raise RuntimeError("subscribers did not connect")
    cpu0 = sum(cpu_s(s.proc.pid) for s in servers)
    hcpu0 = sum(cpu_s(s.proc.pid) for s in history)
    pp = ctx.Process(target=publisher_proc, args=(kind, urls, rooms, pubs, rate, dur, go, out_p))
    pp.start()
    pub = out_p.get(timeout=dur + 120)
    sent = pub["sent"]
    parts = [out_s.get(timeout=dur + 120) for _ in sps]
    cpu1 = sum(cpu_s(s.proc.pid) for s in servers)
    hcpu1 = sum(cpu_s(s.proc.pid) for s in history)
    pp.join(10)
    for sp in sps:
        sp.join(10)
    lat = [x for part in parts for x in part["latencies"]]
    expected = sent * subs / len(rooms)
    return {
        "rate": rate,
        "sent": sent,
        "expected": expected,
        "delivered": len(lat),
        "delivered_per_s": len(lat) / dur,
        "delivery_ratio": len(lat) / expected if expected else 0.0,
        "p50_ms": pct(lat, 0.5) * 1000,
        "p99_ms": pct(lat, 0.99) * 1000,
        "max_ms": max(lat) * 1000 if lat else float("nan"),
        "cpu_s_per_100k": (cpu1 - cpu0) / len(lat) * 1e5 if lat else float("nan"),
        "history_cpu_s_per_100k": (hcpu1 - hcpu0) / len(lat) * 1e5 if lat and history else None,
        "acks": pub["acks"],
        "errors": pub["errors"],
        # share of one core each load generator process used over the step (+2 s drain)
        "loadgen_core_share": {
            "subscribers": round(max(part["cpu_s"] for part in parts) / (dur + 2.0), 2),
            "publishers": round(pub["cpu_s"] / (dur + 2.0), 2),
        },
    }


def settle(pids: list[int], limit: float = 60.0) -> None:
    """Wait until the servers are idle (< 5% of a core over 0.5 s), at most ``limit`` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = sum(cpu_s(p) for p in pids)
        time.sleep(0.5)
        if sum(cpu_s(p) for p in pids) - before < 0.025:
            return


def search_max(
    run: Callable[[float], dict[str, Any]],
    passed: Callable[[dict[str, Any]], bool],
    rates: Sequence[float],
    settle: Callable[[], None],
    extend: int = 2,
    refine: int = 2,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The ramp: ``rates`` in order until one fails; past the list's end, up to ``extend``
    more steps x1.5 while they pass; then ``refine`` bisections between the highest passing
    and the lowest failing rate. Returns (steps in run order, highest passing step)."""
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    failed: float | None = None

    def step(rate: float) -> bool:
        st = run(rate)
        st["ok"] = passed(st)
        steps.append(st)
        return bool(st["ok"])

    todo = list(rates)
    while todo:
        r = todo.pop(0)
        if not step(r):
            failed = r
            break
        best = steps[-1]
        if not todo and extend > 0:
            extend -= 1
            todo.append(round(r * 1.5))
    for _ in range(refine):
        if best is None or failed is None:
            break
        mid = round((best["rate"] + failed) / 2)
        if mid - best["rate"] < 0.1 * best["rate"]:
            break  # within 10%: finer than this run's noise
        settle()  # the overloaded step's backlog drains before the next step
        if step(mid):
            best = steps[-1]
        else:
            failed = mid
    return steps, best


def ramp(
    servers: list[Server],
    rooms: list[str],
    subs: int,
    pubs: int,
    rates: Sequence[float],
    dur: float,
    history: list[Server],
) -> dict[str, Any]:
    def run(r: float) -> dict[str, Any]:
        st = run_rate(servers, rooms, subs, pubs, r, dur, history)
        ok = passes(st["delivery_ratio"], st["p99_ms"])
        print(
            f"  {servers[0].kind:8} rate {r:6.0f}/s -> {st['delivered_per_s']:8.0f} deliv/s "
            f"ratio {st['delivery_ratio']:.3f} p50 {st['p50_ms']:.1f} p99 {st['p99_ms']:.1f} ms "
            f"cpu/100k {st['cpu_s_per_100k']:.2f}s"
            + (f" acks {st['acks']} errors {st['errors']}" if history else "")
            + " loadgen {subscribers:.2f}/{publishers:.2f} core".format(**st["loadgen_core_share"])
            + ("" if ok else "  (fails)"),
            flush=True,
        )
        return st

    steps, best = search_max(
        run,
        lambda st: passes(st["delivery_ratio"], st["p99_ms"]),
        rates,
        lambda: settle([s.proc.pid for s in servers + history]),
    )
    return {"steps": steps, "max_ok": best}


def idle(server: Server, n: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    hold, done = ctx.Queue(), ctx.Event()
    time.sleep(0.5)
    rss0 = rss_kib(server.proc.pid)
    p = ctx.Process(target=idle_proc, args=(server.kind, server.url, n, hold, done))
    p.start()
    opened = hold.get(timeout=300)
    time.sleep(2)
    rss1 = rss_kib(server.proc.pid)
    done.set()
    errors = hold.get(timeout=120)[1]
    p.join(30)
    per = (rss1 - rss0) / opened if opened else float("nan")
    print(
        f"  {server.kind:8} idle {n}: opened {opened} errors {errors} {per:.1f} KiB/conn",
        flush=True,
    )
    return {
        "n": n,
        "opened": opened,
        "errors": errors,
        "rss0_kib": rss0,
        "rss1_kib": rss1,
        "kib_per_conn": per,
        "mib_per_1000": per * 1000 / 1024,
    }


def store_step(gateway: Server, history: list[Server], nats_url: str, rate: float, dur: float):  # type: ignore[no-untyped-def]
    """One (d) step: 20 connections send ``rate`` msgs/s with client_ids; acks are counted."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    g0 = cpu_s(gateway.proc.pid)
    h0 = sum(cpu_s(h.proc.pid) for h in history)
    p = ctx.Process(target=store_proc, args=(gateway.url, 20, rate, dur, out))
    p.start()
    res = out.get(timeout=dur + 180)
    p.join(10)
    g1 = cpu_s(gateway.proc.pid)
    h1 = sum(cpu_s(h.proc.pid) for h in history)
    lat, sent = res["ack_latencies"], res["sent"]
    return {
        "rate": rate,
        "sent": sent,
        "acked": len(lat),
        "acked_per_s": len(lat) / dur,
        "ack_ratio": len(lat) / sent if sent else 0.0,
        "p50_ms": pct(lat, 0.5) * 1000,
        "p99_ms": pct(lat, 0.99) * 1000,
        "max_ms": max(lat) * 1000 if lat else float("nan"),
        "errors": res["errors"],
        "history_cpu_s_per_1k": (h1 - h0) / len(lat) * 1e3 if lat else float("nan"),
        "gateway_cpu_s_per_1k": (g1 - g0) / len(lat) * 1e3 if lat else float("nan"),
    }


def stored_messages(nats_url: str) -> int:
    import asyncio

    import nats

    async def count() -> int:
        nc = await nats.connect(nats_url)
        try:
            info = await nc.jetstream().stream_info("HISTORY")
            return int(info.state.messages)
        finally:
            await nc.close()

    return asyncio.run(count())


def scenario_d(replicas: int, rates: Sequence[float], dur: float, tmp: Path) -> dict[str, Any]:
    """History store rate with ``replicas`` history processes, on a fresh nats-server."""
    nats = NatsServer(store_dir=tmp / f"nats-d{replicas}").start()
    history = [Server("history", nats.url, tmp) for _ in range(replicas)]
    gateway = Server("roombus", nats.url, tmp)

    def run(r: float) -> dict[str, Any]:
        st: dict[str, Any] = store_step(gateway, history, nats.url, r, dur)
        print(
            f"  history x{replicas} rate {r:6.0f}/s -> {st['acked_per_s']:7.0f} acked/s "
            f"ratio {st['ack_ratio']:.3f} p50 {st['p50_ms']:.1f} p99 {st['p99_ms']:.1f} ms "
            f"history cpu/1k {st['history_cpu_s_per_1k']:.2f}s errors {st['errors']}",
            flush=True,
        )
        return st

    try:
        steps, best = search_max(
            run,
            lambda st: passes(st["ack_ratio"], st["p99_ms"]),
            rates,
            lambda: settle([x.proc.pid for x in [gateway, *history]]),
        )
        stored = stored_messages(nats.url)
        acked = sum(st["acked"] for st in steps)
        print(f"  history x{replicas}: {acked} acked, {stored} stored in HISTORY", flush=True)
    finally:
        for x in [gateway, *history]:
            x.stop()
        nats.stop()
    return {
        "replicas": replicas,
        "steps": steps,
        "max_ok": best,
        "acked_total": acked,
        "stored_total": stored,
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="short steps, fewer rates")
    ap.add_argument("--only", default="a,b,c,d", help="scenarios to run (default: a,b,c,d)")
    ap.add_argument(
        "--kinds", default=",".join(KINDS), help="servers for a-c (default: %(default)s)"
    )
    a = ap.parse_args()
    raise_nofile()
    quick = a.quick
    only = set(a.only.split(","))
    kinds = [k for k in KINDS if k in a.kinds.split(",")]
    dur = 3.0 if quick else 5.0
    rates_a = [20, 40, 80, 160] if quick else [20, 40, 80, 120, 160, 240, 320, 480]
    rates_b = (
        [200, 400, 800, 1600] if quick else [200, 400, 800, 1200, 1600, 2400, 3200, 4800, 6400]
    )
    rates_d = [250, 500, 1000] if quick else [250, 500, 1000, 2000, 3000, 4000]
    idle_ns = [2000] if quick else [5000, 10000]
    name = "quick" if quick else "full"
    out = ROOT / "bench" / "results" / f"{name}.json"
    # A partial run (--only/--kinds) updates its figures in the existing results.
    partial = only != {"a", "b", "c", "d"} or len(kinds) < len(KINDS)
    results: dict[str, Any] = json.loads(out.read_text()) if partial and out.exists() else {}
    results.update(
        {"quick": quick, "duration_s": dur, "started": time.time(), "cpus": os.cpu_count()}
    )
    results.setdefault("scenarios", {})
    tmp = Path(tempfile.mkdtemp(prefix="roombus-bench-"))
    rooms_b = [f"r{i}" for i in range(100)]
    for kind in kinds:
        if not only & ({"a", "b"} if kind == "fanout" else {"a", "b", "c"}):
            continue
        nats = NatsServer(store_dir=tmp / f"nats-{kind}").start()
        try:
            # roombus runs as deployed: the gateway waits for storage acks, so two history
            # replicas store every message (their CPU is reported apart from the gateways').
            history = (
                [Server("history", nats.url, tmp) for _ in range(2)] if kind == "roombus" else []
            )
            servers = [Server(kind, nats.url, tmp) for _ in range(2)]
            try:
                if "a" in only:
                    print(f"(a) 200 subscribers, 1 room, 2 gateways [{kind}]", flush=True)
                    results["scenarios"].setdefault("a", {})[kind] = ramp(
                        servers, ["lobby"], 200, 4, rates_a, dur, history
                    )
                if "b" in only:
                    print(f"(b) 200 subscribers, 100 rooms, 2 gateways [{kind}]", flush=True)
                    results["scenarios"].setdefault("b", {})[kind] = ramp(
                        servers, rooms_b, 200, 100, rates_b, dur, history
                    )
            finally:
                for x in servers + history:
                    x.stop()
            if "c" in only and kind != "fanout":  # same gateway process as roombus
                for n in idle_ns:
                    one = Server(kind, nats.url, tmp)
                    try:
                        results["scenarios"].setdefault(f"c{n}", {})[kind] = idle(one, n)
                    finally:
                        one.stop()
        finally:
            nats.stop()
    if "d" in only:
        for replicas in (1, 2):
            print(f"(d) history store rate, {replicas} replica(s), 1 gateway", flush=True)
            results["scenarios"].setdefault("d", {})[f"replicas_{replicas}"] = scenario_d(
                replicas, rates_d, dur, tmp
            )
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    from bench.report import plot

    plot(results, ROOT / "docs" / ("bench-quick.png" if quick else "bench.png"))


if __name__ == "__main__":
    main()
