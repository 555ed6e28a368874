"""``roombus tail`` / ``send`` / ``chat`` (the client's CLI) as real processes: tail prints what a
WebSocket client sends, once, in order; chat is driven through a pseudo-terminal."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.support.client import Client

ROOMBUS = str(Path(sys.executable).with_name("roombus"))
pytestmark = pytest.mark.timeout(120)


async def read_until(fd: int, want: str, buf: list[str], timeout: float = 20.0) -> str:
    """Read the pty (or pipe) ``fd`` until ``want`` appeared; returns all read so far."""
    os.set_blocking(fd, False)
    deadline = time.monotonic() + timeout
    while want not in "".join(buf):
        assert time.monotonic() < deadline, f"no {want!r} in {''.join(buf)[-800:]!r}"
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            await asyncio.sleep(0.05)
            continue
        except OSError:  # the pty closed
            break
        buf.append(chunk.decode(errors="replace"))
    return "".join(buf)


async def test_tail_prints_what_a_websocket_client_sends_and_send_is_acked(
    shared_stack: Stack, room: str
) -> None:
    g = shared_stack.gateway
    url = f"ws://127.0.0.1:{g.port}/ws"
    tail = subprocess.Popen(
        [ROOMBUS, "tail", room, "--url", url, "--json", "--user", "tailer"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert tail.stdout is not None
        fd, out = tail.stdout.fileno(), list[str]()
        ws = await Client.open(g.ws_url, "walt")
        await ws.join(room)
        deadline = time.monotonic() + 20
        while g.metric("roombus_gateway_open_connections") < 2:  # tail joined
            assert time.monotonic() < deadline and tail.poll() is None
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        texts = [f"from the page {i}" for i in range(5)]
        for i, text in enumerate(texts):
            await ws.send("chat.message", room=room, text=text, client_id=f"t{i}")
        sent = subprocess.run(
            [ROOMBUS, "send", room, "and from the CLI", "--url", url, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert sent.returncode == 0, sent.stderr
        ack = json.loads(sent.stdout)
        seen = await read_until(fd, "and from the CLI", out)
        msgs = [json.loads(x) for x in seen.splitlines() if x.strip()]
        assert [m["text"] for m in msgs] == [*texts, "and from the CLI"]
        seqs = [m["seq"] for m in msgs]
        assert seqs == sorted(set(seqs)) and msgs[-1]["seq"] == ack["seq"]
        assert msgs[-1]["id"] == ack["id"] and msgs[0]["user"] == "walt"
    finally:
        tail.terminate()
        await asyncio.to_thread(tail.wait, 10)
        if tail.stdout is not None:
            tail.stdout.close()


async def test_chat_in_a_pseudo_terminal_sends_receives_and_shows_typing_and_presence(
    shared_presence_stack: Stack, room: str
) -> None:
    g = shared_presence_stack.gateway
    other = await Client.open(g.ws_url, "olga")
    await other.join(room)
    pid, fd = pty.fork()
    if pid == 0:  # the child: roombus chat on the terminal
        url = f"ws://127.0.0.1:{g.port}/ws"
        os.execv(ROOMBUS, [ROOMBUS, "chat", room, "--url", url, "--user", "zed"])
    buf: list[str] = []
    try:
        await read_until(fd, "you are zed", buf)
        await read_until(fd, "> ", buf)
        os.write(fd, b"hello from the terminal\r")
        await other.wait_texts(["hello from the terminal"], room)
        await read_until(fd, "zed: hello from the terminal", buf)
        await other.send("typing", room=room)
        await read_until(fd, "olga is typing", buf)
        await other.send("chat.message", room=room, text="hi zed", client_id="o1")
        await read_until(fd, "olga: hi zed", buf)
        late = await Client.open(g.ws_url, "lena")
        await late.join(room)
        await read_until(fd, "lena joined", buf)
        # Line editing: write, erase a word's end with backspace, use the history (up arrow).
        os.write(fd, b"typo\x7f\x7f\x7f\x7fsecond\r")
        await read_until(fd, "zed: second", buf)
        os.write(fd, b"\x1b[A again\r")  # up: "second", then " again"
        await read_until(fd, "zed: second again", buf)
        # Others see zed typing while a line is being written.
        os.write(fd, b"half a line")
        await other.wait(lambda _: other.of("typing", user="zed"), 10, "zed typing")
        os.write(fd, b"\x15/who\r")  # Ctrl-U clears the line
        await read_until(fd, "here (3)", buf)
        os.write(fd, b"/quit\r")
        deadline = time.monotonic() + 15
        while True:
            done, status = await asyncio.to_thread(os.waitpid, pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "chat did not exit"
            await asyncio.sleep(0.1)
        assert os.waitstatus_to_exitcode(status) == 0
        assert other.texts(room) == ["hello from the terminal", "hi zed", "second", "second again"]
    finally:
        try:
            os.kill(pid, 9)
            await asyncio.to_thread(os.waitpid, pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
