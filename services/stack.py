"""``roombus up``: nats-server with JetStream plus the services, as child processes, no Docker."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .extras import available, message
from .natsserver import NatsCluster, NatsServer, die_with_parent
from .ports import free_port, port_free

RESTARTS_MAX = 5


def add_up_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "up", help="run nats-server and every service locally (no Docker); Ctrl-C stops all"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface the gateways bind")
    p.add_argument("--nats-port", type=int, default=None, help="default 4222, or a free port")
    p.add_argument(
        "--nats-cluster",
        type=int,
        default=1,
        choices=[1, 3, 5],
        metavar="N",
        help="run N nats-server nodes as one JetStream cluster (routes on loopback) with R3"
        " storage; client ports --nats-port.. --nats-port+N-1 (default 1: a single server)",
    )
    p.add_argument("--gateways", type=int, default=2, help="gateway processes (default 2)")
    p.add_argument("--gateway-port", type=int, default=8080, help="first gateway port")
    p.add_argument("--history", type=int, default=2, help="history replicas (default 2)")
    p.add_argument("--data-dir", default=".roombus", help="nats-server store and logs")
    p.add_argument(
        "--sync-interval",
        default=None,
        metavar="DURATION",
        help="JetStream fsync interval (nats-server sync_interval): 'always' fsyncs every write"
        " (an acked message survives an OS crash), e.g. '2m' (server default) batches",
    )


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches `up` only; it stops children in order
            preexec_fn=die_with_parent,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def run_up(args: dict[str, Any]) -> int:
    data_dir = Path(args["data_dir"]).resolve()
    nats_port = args["nats_port"]
    size = args.get("nats_cluster") or 1
    if nats_port is None:
        nats_port = 4222 if all(port_free(4222 + i) for i in range(size)) else None
        nats_ports = [nats_port + i if nats_port else free_port() for i in range(size)]
    elif not all(port_free(nats_port + i) for i in range(size)):
        print(f"roombus up: NATS port {nats_port} (or one after it) is taken", file=sys.stderr)
        return 2
    else:
        nats_ports = [nats_port + i for i in range(size)]
    gw_ports = [args["gateway_port"] + i for i in range(args["gateways"])]
    for port in gw_ports:
        if not port_free(port, args["host"]):
            print(f"roombus up: port {port} is taken (use --gateway-port)", file=sys.stderr)
            return 2

    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    if size == 1:
        nats = NatsServer(store_dir=data_dir / "nats", port=nats_ports[0], name="roombus-local")
        if args.get("sync_interval"):
            conf = data_dir / "nats-sync.conf"
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(f"jetstream {{ sync_interval: {args['sync_interval']} }}\n")
            nats.config_file = conf
        nats.start(pdeathsig=True)
        brokers, nats_url, store = [nats], nats.url, nats.store_dir
        env = {**os.environ, "NATS_URL": nats_url}
    else:
        cluster = NatsCluster(
            base_dir=data_dir / "nats-cluster",
            size=size,
            name="roombus-local",
            client_ports=nats_ports,
            sync_interval=args.get("sync_interval"),
        )
        cluster.start(pdeathsig=True)
        brokers, nats_url, store = cluster.nodes, cluster.url, cluster.base_dir
        # Every service gets every node's URL; the JetStream assets are R3. The user's
        # own environment wins over these defaults.
        r = str(min(3, size))
        replicas = {"HISTORY_REPLICAS": r, "PRESENCE_REPLICAS": r}
        env = {**replicas, **os.environ, "NATS_URL": nats_url}
    py = [sys.executable, "-m", "services.cli"]
    children = [
        Child(
            f"gateway-{i + 1}",
            [*py, "gateway", "--host", args["host"], "--port", str(port)],
            # A local demo with self-named users: DMs on (unless the environment says no).
            {"INSECURE_DMS": "true", **env, "INSTANCE": f"gateway-{i + 1}"},
        )
        for i, port in enumerate(gw_ports)
    ]
    for i in range(args["history"]):
        children.append(
            Child(
                f"history-{i + 1}",
                [*py, "history", "--port", str(free_port())],
                {**env, "INSTANCE": f"history-{i + 1}"},
            )
        )
    children.append(
        Child(
            "presence",
            [*py, "presence", "--port", str(free_port())],
            {**env, "INSTANCE": "presence"},
        )
    )
    bridge_line = add_bridge_if_redis(children, py, env)
    for child in children:
        child.start()

    print(
        "\nroombus is up\n"
        + (f"  NATS:      {nats_url}  (store {store})\n" if size == 1 else "")
        + (
            f"  NATS:      cluster of {size} (JetStream R{env.get('HISTORY_REPLICAS')}), store"
            f" {store}\n" + "".join(f"             {n.url}\n" for n in brokers)
            if size > 1
            else ""
        )
        + "".join(f"  chat page: http://{args['host']}:{p}/\n" for p in gw_ports)
        + f"  history:   {args['history']} replicas ({_streams(env)})\n"
        + "  presence:  1 (bucket presence)\n"
        + bridge_line
        + f"  watch:     nats sub 'room.>' --server {nats_url}\n"
        "  Ctrl-C stops everything.\n",
        flush=True,
    )
    code = 0
    try:
        while not stopping:
            time.sleep(0.2)
            down = [b for b in brokers if b.proc is not None and b.proc.poll() is not None]
            if down and size == 1:
                print("roombus up: nats-server exited; stopping", file=sys.stderr)
                code = 1
                break
            for node in down if not stopping else []:
                # The cluster keeps serving; the node comes back and catches up.
                print(f"roombus up: NATS node {node.name} exited; restarting", file=sys.stderr)
                try:
                    node.start(pdeathsig=True)
                except (RuntimeError, TimeoutError) as exc:
                    print(f"roombus up: {node.name} did not restart: {exc}", file=sys.stderr)
                    stopping, code = True, 1
            for child in children:
                if not child.alive() and not stopping:
                    now = time.monotonic()
                    child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                    if len(child.restarts) > RESTARTS_MAX:
                        print(f"roombus up: {child.name} keeps crashing; stopping", file=sys.stderr)
                        stopping, code = True, 1
                        break
                    print(f"roombus up: {child.name} exited; restarting", file=sys.stderr)
                    child.start()
    finally:
        print("\nroombus up: stopping services...", file=sys.stderr, flush=True)
        for child in children:
            if child.alive():
                assert child.proc is not None
                child.proc.terminate()
        deadline = time.monotonic() + 15
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        for broker in brokers:
            broker.stop()
        print("roombus up: stopped", file=sys.stderr, flush=True)
    return code


def _streams(env: dict[str, str]) -> str:
    """The history streams, as HISTORY_SHARDS (from the environment) makes them."""
    shards = env.get("HISTORY_SHARDS", "1").strip()
    if not shards.isdigit() or int(shards) <= 1:
        return "stream HISTORY"
    return f"streams HISTORY_0..HISTORY_{int(shards) - 1}"


def add_bridge_if_redis(children: list[Child], py: list[str], env: dict[str, str]) -> str:
    """Add the Redis bridge when ``REDIS_URL`` answers a PING; returns the banner line."""
    url = env.get("REDIS_URL", "redis://127.0.0.1:6379")
    scheme, sep, rest = url.partition("://")
    shown = f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else url  # no password
    if not available("redis"):
        return f"  bridge:    off ({message('redis', 'the bridge')})\n"
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"  bridge:    off (Redis {shown} did not answer PING: {type(exc).__name__})\n"
    children.append(
        Child(
            "bridge",
            [*py, "bridge", "--port", str(free_port())],
            {**env, "REDIS_URL": url, "INSTANCE": "bridge"},
        )
    )
    return f"  bridge:    on (Redis {shown} room:* <-> NATS room.*.message)\n"
