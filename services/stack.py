"""``roombus up``: nats-server with JetStream plus the services, as child processes, no Docker."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .natsserver import NatsServer, die_with_parent

RESTARTS_MAX = 5


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def add_up_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "up", help="run nats-server and every service locally (no Docker); Ctrl-C stops all"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface the gateways bind")
    p.add_argument("--nats-port", type=int, default=None, help="default 4222, or a free port")
    p.add_argument("--gateways", type=int, default=2, help="gateway processes (default 2)")
    p.add_argument("--gateway-port", type=int, default=8080, help="first gateway port")
    p.add_argument("--history", type=int, default=2, help="history replicas (default 2)")
    p.add_argument("--data-dir", default=".roombus", help="nats-server store and logs")


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
    if nats_port is None:
        nats_port = 4222 if port_free(4222) else free_port()
    elif not port_free(nats_port):
        print(f"roombus up: NATS port {nats_port} is taken", file=sys.stderr)
        return 2
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

    nats = NatsServer(store_dir=data_dir / "nats", port=nats_port, name="roombus-local")
    nats.start(pdeathsig=True)
    env = {**os.environ, "NATS_URL": nats.url}
    py = [sys.executable, "-m", "services.cli"]
    children = [
        Child(
            f"gateway-{i + 1}",
            [*py, "gateway", "--host", args["host"], "--port", str(port)],
            {**env, "INSTANCE": f"gateway-{i + 1}"},
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
    for child in children:
        child.start()

    print(
        "\nroombus is up\n"
        f"  NATS:      {nats.url}  (store {nats.store_dir})\n"
        + "".join(f"  chat page: http://{args['host']}:{p}/\n" for p in gw_ports)
        + f"  history:   {args['history']} replicas (stream HISTORY)\n"
        + "  presence:  1 (bucket presence)\n"
        + f"  watch:     nats sub 'room.>' --server {nats.url}\n"
        "  Ctrl-C stops everything.\n",
        flush=True,
    )
    code = 0
    try:
        while not stopping:
            time.sleep(0.2)
            if nats.proc is not None and nats.proc.poll() is not None:
                print("roombus up: nats-server exited; stopping", file=sys.stderr)
                code = 1
                break
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
        nats.stop()
        print("roombus up: stopped", file=sys.stderr, flush=True)
    return code
