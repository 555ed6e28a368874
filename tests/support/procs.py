"""Real processes for tests: nats-server, redis-server and roombus services on free ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# free_port is the services' own (``roombus up`` needs it at run time, and services/ cannot
# import tests/); the waits are the tests' (services/ has no use for them).
from services.natsserver import NatsServer
from services.ports import free_port, port_free
from tests.support.wait import until, wait_for

ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "NatsServer",
    "RedisServer",
    "ServiceProc",
    "free_port",
    "http_get",
    "port_free",
    "until",
    "wait_for",
]


_TLS = ssl.create_default_context()
"""Given to every probe: ``httpx.get`` would otherwise build a context, loading the CA bundle
(~18 ms of CPU), per call, though the services speak plain HTTP. Probes poll every 50 ms."""


def http_get(url: str, timeout: float) -> httpx.Response:
    """``httpx.get`` for the probes of the test processes (``/readyz``, ``/metrics``)."""
    return httpx.get(url, timeout=timeout, verify=_TLS)


def ensure_redis_server() -> str:
    """Path of redis-server, installing Debian's package when missing and allowed (root)."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "redis-server", "redis-tools"],
            check=True,
            env=env,
            capture_output=True,
        )
        found = shutil.which("redis-server")
        if found:
            return found
    raise RuntimeError(
        "redis-server is needed by the bridge tests: install it with "
        "`sudo apt-get install -y redis-server` (Debian/Ubuntu) or `brew install redis` (macOS)"
    )


@dataclass
class RedisServer:
    """A redis-server child process on a free loopback port with its own dir."""

    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        binary = ensure_redis_server()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                str(self.workdir / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._ping, 15, "redis-server to answer PING")
        return self

    def _ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a socket listening on ``port``; ``None`` where ``/proc``
    cannot tell (not Linux, or the process is gone)."""
    try:
        held = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                held.add(target[len("socket:[") : -1])
    except OSError:
        return None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()  # sl local_address rem_address st ... inode
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port and cols[9] in held:
                return True
    return False


def scrape_metric(http: str, name: str, labels: str = "", timeout: float = 5) -> float:
    """Sum of the samples of ``name`` (those whose labels contain ``labels``) in the
    Prometheus text a service serves at ``<http>/metrics``."""
    total = 0.0
    for line in http_get(f"{http}/metrics", timeout).text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        base, _, lab = key.partition("{")
        if base == name and (not labels or labels in lab):
            total += float(value)
    return total


@dataclass
class ServiceProc:
    """``roombus <service>`` as a real subprocess with its own port and log file."""

    service: str
    env: dict[str, str]
    logdir: Path
    args: list[str] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _own_port: bool = field(default=False, init=False, repr=False)
    """The port was picked by ``start``: another may be picked if someone takes it first."""

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> ServiceProc:
        self._own_port = not self.port
        if not self.port:
            self.port = free_port()
        self._spawn()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def _spawn(self) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.logdir / f"{self.service}-{self.port}.log"
        logf = self.log_path.open("ab")
        env = {**os.environ, **self.env, "PORT": str(self.port)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", self.service, *self.args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
        logf.close()

    def ready(self) -> bool:
        """``/readyz`` answers 200, and from this process: ``free_port`` gives a port that was
        free a moment ago, and until this service binds it (after its imports, seconds on a
        loaded machine) another process of a parallel run may take it."""
        try:
            if http_get(f"{self.http}/readyz", 1).status_code != 200:
                return False
        except httpx.HTTPError:
            return False
        return self.proc is None or listens_on(self.proc.pid, self.port) is not False

    def wait_ready(self, timeout: float = 20.0) -> None:
        def check() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                if self._own_port and "address already in use" in self.log():
                    # Its port was taken before it could bind it: the same, on another.
                    self.port = free_port()
                    self._spawn()
                    return False
                raise AssertionError(f"{self.service} exited early:\n{self.log()}")
            return self.ready()

        try:
            wait_for(check, timeout, f"{self.service} on :{self.port} to be ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- log ---\n{self.log()}") from None

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a Prometheus sample (``name{labels}``) scraped from ``/metrics``."""
        return scrape_metric(self.http, name, labels)

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-6000:]

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.service} did not stop on SIGTERM:\n{self.log()}") from None

    def kill(self) -> None:
        """kill -9: no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
