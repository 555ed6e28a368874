"""`roombus up`: the whole local stack as child processes, stopped cleanly by Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.client import open_when_up
from tests.support.procs import ROOT, free_port, port_free, until


def _descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc: no extra dependency)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_roombus_up_runs_a_chat_across_two_gateways_and_ctrl_c_stops_all(
    tmp_path: Path, room: str
) -> None:
    port = free_port()
    while not all(port_free(p) for p in (port, port + 1)):
        port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--gateway-port",
            str(port),
            "--nats-port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "stack"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        a = await open_when_up(f"ws://127.0.0.1:{port}/ws", "a")
        b = await open_when_up(f"ws://127.0.0.1:{port + 1}/ws", "b")
        await a.join(room)
        await b.join(room)
        await a.send("chat.message", room=room, text="across the stack", client_id="s1")
        await b.wait_texts(["across the stack"])
        await a.next("ack", client_id="s1")  # the history replicas run too
        family = _descendants(proc.pid)
        assert len(family) >= 5  # nats-server, 2 gateways, 2 history replicas
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        out, _ = await asyncio.to_thread(proc.communicate, timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.decode(errors="replace")
    assert "roombus is up" in text and f"http://127.0.0.1:{port}/" in text
    assert proc.returncode == 0, text[-3000:]
    await until(lambda: not any(_alive(p) for p in family), 10, "no orphan processes")
