"""``roombus chat ROOM``: a terminal chat. The line editor is the standard library's readline
(arrows, Ctrl-R, history of what you sent); messages, typing hints and arrivals print above the
line you are writing, which is redrawn."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time

from .client import Client
from .errors import NotRecovered, RequestFailed, SendRefused, SendTimeout
from .room import Room
from .types import PresenceChange, Typing

try:
    import readline
except ImportError:  # Windows: plain input()
    readline = None  # type: ignore[assignment]

PROMPT = "> "
TYPING_EVERY = 2.0  # seconds between our typing signals
HINT_EVERY = 5.0  # seconds before the same person's typing hint is shown again
HELP = "/who: who is here · /quit (or Ctrl-D): leave · anything else: send it"


class Terminal:
    """Prints above the line being edited and redraws it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def show(self, text: str) -> None:
        with self.lock:
            buffer = readline.get_line_buffer() if readline is not None else ""
            sys.stdout.write(f"\r\x1b[2K{text}\n{PROMPT}{buffer}")
            sys.stdout.flush()


def _reader(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str | None]) -> None:
    while True:
        try:
            text: str | None = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            text = None
        loop.call_soon_threadsafe(lines.put_nowait, text)
        if text is None:
            return


async def _messages(room: Room, term: Terminal) -> None:
    while True:
        try:
            async for msg in room:
                term.show(f"{msg.ts:%H:%M} {msg.user}: {msg.text}")
        except NotRecovered as gap:
            term.show(f"* some messages could not be replayed ({gap.reason})")


async def _signals(room: Room, term: Terminal, me: str | None) -> None:
    shown: dict[str, float] = {}
    async for sig in room.signals():
        if isinstance(sig, Typing) and sig.user != me:
            if time.monotonic() - shown.get(sig.user, 0.0) > HINT_EVERY:
                shown[sig.user] = time.monotonic()
                term.show(f"* {sig.user} is typing…")
        elif isinstance(sig, PresenceChange) and sig.user != me:
            here = f" ({sig.count} here)" if sig.count is not None else ""
            term.show(f"* {sig.user} {'joined' if sig.event == 'join' else 'left'}{here}")


async def _typing(room: Room) -> None:
    """readline's buffer is what the user is writing: changed and not empty = typing."""
    last, sent = "", 0.0
    while readline is not None:
        await asyncio.sleep(0.3)
        buffer = readline.get_line_buffer()
        if buffer and buffer != last and time.monotonic() - sent > TYPING_EVERY:
            sent = time.monotonic()
            await room.typing()
        last = buffer


async def _send(room: Room, text: str, term: Terminal) -> None:
    try:
        await room.send(text, timeout=120)
    except (SendRefused, SendTimeout) as exc:
        term.show(f"* not sent: {exc}")


async def _who(room: Room, term: Terminal) -> None:
    try:
        p = await room.presence()
        term.show(f"* here ({p.count}): {', '.join(p.members)}")
    except RequestFailed as exc:
        term.show(f"* presence: {exc}")


async def chat(client: Client, name: str) -> int:
    term = Terminal()
    async with client as c:
        room = await c.join(name)
        members = ", ".join(room.joined.members or ()) if room.joined else ""
        print(f"* you are {c.me} in #{name}" + (f"; here: {members}" if members else ""))
        print(f"* {HELP}")
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        threading.Thread(
            target=_reader, args=(asyncio.get_running_loop(), lines), daemon=True
        ).start()
        tasks = [
            asyncio.create_task(_messages(room, term)),
            asyncio.create_task(_signals(room, term, c.me)),
            asyncio.create_task(_typing(room)),
        ]
        sends: list[asyncio.Task[None]] = []
        try:
            while (text := await lines.get()) is not None:
                if text.strip() in ("/quit", "/exit"):
                    break
                if text.strip() == "/who":
                    tasks.append(asyncio.create_task(_who(room, term)))
                elif text.strip():
                    sends.append(asyncio.create_task(_send(room, text, term)))
            if sends:  # what was written goes out before we do
                await asyncio.wait(sends, timeout=30)
        finally:
            tasks += sends
            for t in tasks:
                t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
        sys.stdout.write("\n")
    return 0
