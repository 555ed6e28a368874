"""The chat page in headless Chromium: two pages on two gateways, presence, typing, acks,
offline and back with the missed messages once, scroll-back into history, unread counts,
gateway errors, and user text that stays text.

``ROOMBUS_SCREENSHOT=docs/screenshot.png`` makes the conversation test write the README's
screenshot there (it always writes one under the test's tmp dir).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest

from tests.conftest import ServiceFactory, Stack
from tests.support.client import Client
from tests.support.procs import ServiceProc, wait_for

try:
    import playwright  # noqa: F401
except ImportError:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise  # CI installs the dev extra: a missing package is a failure there, not a skip
    pytest.skip("the Python package playwright is missing", allow_module_level=True)

from playwright.async_api import Browser, Dialog, Locator, Page, expect  # noqa: E402

# The first test may install Chromium (apt) during its setup: room for that in the bound.
pytestmark = [pytest.mark.browser, pytest.mark.timeout(480)]

ROOT = Path(__file__).resolve().parents[2]
T = 20_000  # ms: generous, the machine is shared
RECONNECT_T = 60_000  # backoff is capped at 15 s; a restart and a retry fit well inside
# Records when the page opens a WebSocket (s), to check reconnects and the backoff.
COUNT_SOCKETS = (
    "const Orig = window.WebSocket; window.__attempts = [];"
    "window.WebSocket = class extends Orig { constructor(...a) {"
    " window.__attempts.push(performance.now() / 1000); super(...a); } };"
)


@dataclass
class Chat:
    """One browser page of the chat, with what went wrong inside it."""

    page: Page
    user: str
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def msgs(self, text: str | None = None) -> Locator:
        loc = self.page.locator("#log li.msg")
        return loc if text is None else loc.filter(has=self.page.get_by_text(text, exact=True))

    def texts(self) -> Locator:
        return self.page.locator("#log li.msg .text")

    async def say(self, text: str) -> None:
        await self.page.fill("#text", text)
        await self.page.press("#text", "Enter")

    def assert_clean(self) -> None:
        assert self.errors == [], f"{self.user}: JavaScript errors {self.errors}"
        assert self.dialogs == [], f"{self.user}: dialogs opened {self.dialogs}"


async def open_chat(browser: Browser, gw: ServiceProc, user: str, room: str) -> Chat:
    ctx = await browser.new_context(viewport={"width": 800, "height": 540}, device_scale_factor=1)
    page = await ctx.new_page()
    chat = Chat(page, user)
    page.on("pageerror", lambda exc: chat.errors.append(str(exc)))

    async def on_dialog(dialog: Dialog) -> None:
        chat.dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    await page.add_init_script(COUNT_SOCKETS)
    await page.goto(f"{gw.http}/?user={user}&room={room}", timeout=T)
    await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=T)
    await expect(page.locator(f'#rooms li[data-room="{room}"]:not(.pending)')).to_have_count(
        1, timeout=T
    )
    return chat


async def save_screenshot(browser: Browser, left: Chat, right: Chat, path: Path) -> None:
    """Both pages side by side in one PNG (composed by the browser itself: no image library)."""
    shots = []
    for chat in (left, right):
        png = await chat.page.screenshot()
        shots.append(base64.b64encode(png).decode())
    figures = "".join(
        f'<figure><figcaption>{label}</figcaption><img src="data:image/png;base64,{b64}"></figure>'
        for label, b64 in zip(
            (f"{left.user} on gateway A", f"{right.user} on gateway B"), shots, strict=True
        )
    )
    page = await browser.new_page(viewport={"width": 1660, "height": 600}, device_scale_factor=1)
    await page.set_content(
        "<style>body{margin:0;padding:14px;background:#c9ced8;display:flex;gap:14px;"
        "font:600 13px system-ui,sans-serif;color:#1b2130}figure{margin:0}"
        "figcaption{padding:0 2px 6px}img{display:block;border-radius:8px;"
        "box-shadow:0 2px 10px rgba(0,0,0,.18)}</style>" + figures
    )
    await page.locator("img").nth(1).wait_for(timeout=T)
    path.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(path), full_page=True)
    await page.close()


class Balancer:
    """A TCP load balancer in miniature: round-robin over gateways, skipping refused ones.

    ``closed = True`` plays "no healthy backend": new connections are dropped at once.
    """

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.turn = 0
        self.closed = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Balancer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        upstream = None
        try:
            upstream = None if self.closed else await self._connect()
            if upstream is None:
                return
            up_reader, up_writer = upstream
            self._writers.add(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._tasks.discard(task)
            for w in [writer, *([upstream[1]] if upstream else [])]:
                w.close()
                self._writers.discard(w)
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in self.ports:
            port = self.ports[self.turn % len(self.ports)]
            self.turn += 1
            try:
                return await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue  # that gateway is down: the next one
        return None

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


async def test_two_pages_on_two_gateways_chat_with_presence_typing_and_acks(
    shared_presence_stack: Stack, browser: Browser, room: str, tmp_path: Path
) -> None:
    ga, gb = shared_presence_stack.gateways
    alice = await open_chat(browser, ga, "alice", room)
    bob = await open_chat(browser, gb, "bob", room)

    # Presence across gateways: each page lists both, itself marked.
    await expect(alice.page.locator("#members li")).to_have_text(["alice (you)", "bob"], timeout=T)
    await expect(bob.page.locator("#members li")).to_have_text(["alice", "bob (you)"], timeout=T)

    await alice.say("Hi Bob! This went through gateway A.")
    await expect(bob.texts()).to_have_text(["Hi Bob! This went through gateway A."], timeout=T)
    # Sender and time on the receiving side; own message marked and acked (stored) on alice's.
    received = bob.msgs().first
    await expect(received.locator(".who")).to_have_text("alice")
    await expect(received.locator("time")).not_to_have_text("")
    await expect(received).not_to_have_class("msg mine")
    sent = alice.msgs().first
    await expect(sent).to_have_class("msg mine")
    await expect(sent).to_have_attribute("data-state", "stored", timeout=T)
    await expect(sent.locator(".status")).to_have_text("\u2713")

    # Typing: bob starts typing, alice's page says so.
    await bob.page.fill("#text", "Hey")
    await expect(alice.page.locator("#typing")).to_have_text("bob is typing\u2026", timeout=T)
    await bob.page.press("#text", "Enter")
    await expect(alice.page.locator("#typing")).to_have_text("", timeout=T)

    await alice.say("Rooms work across processes: NATS carries every message.")
    await bob.say("Nice \u2014 and presence shows both of us.")
    conversation = [
        "Hi Bob! This went through gateway A.",
        "Hey",
        "Rooms work across processes: NATS carries every message.",
        "Nice \u2014 and presence shows both of us.",
    ]
    for chat in (alice, bob):
        await expect(chat.texts()).to_have_text(conversation, timeout=T)
        await expect(
            chat.page.locator('#log li.msg.mine:not([data-state="stored"])')
        ).to_have_count(0, timeout=T)
    assert await alice.page.locator("#conn-pill").text_content() == "online"
    # Keystrokes over a few seconds, as a person types (typing hints are rate-limited).
    await alice.page.locator("#text").press_sequentially("Next: scroll-back into hist", delay=100)
    await expect(bob.page.locator("#typing")).to_have_text("alice is typing\u2026", timeout=T)

    shot = tmp_path / "screenshot.png"
    await save_screenshot(browser, alice, bob, shot)
    assert shot.stat().st_size > 10_000
    wanted = os.environ.get("ROOMBUS_SCREENSHOT")
    if wanted:
        shutil.copyfile(shot, ROOT / wanted)
    alice.assert_clean()
    bob.assert_clean()


async def test_page_whose_gateway_restarts_shows_missed_messages_exactly_once(
    shared_presence_stack: Stack, services: ServiceFactory, browser: Browser, room: str
) -> None:
    # Gateways of its own (one restarts) beside the shared history and presence services.
    nats = shared_presence_stack.nats
    ga, gb = (services("gateway", nats, history=False) for _ in range(2))
    alice = await open_chat(browser, ga, "alice", room)
    bob = await open_chat(browser, gb, "bob", room)
    await alice.say("before")
    await expect(bob.texts()).to_have_text(["before"], timeout=T)

    await bob.page.evaluate("window.__attempts = []")
    assert gb.terminate() == 0  # bob's gateway goes away (clients closed with 1012)
    await expect(bob.page.locator("#conn")).to_have_attribute("data-state", "offline", timeout=T)
    await expect(alice.page.locator("#members li")).to_have_text(["alice (you)"], timeout=T)

    missed = [f"missed {i}" for i in range(1, 4)]
    for text in missed:
        await alice.say(text)
    await expect(alice.page.locator('#log li.msg[data-state="stored"]')).to_have_count(4, timeout=T)
    # bob writes while offline: queued on the page, sent once the connection is back.
    await bob.say("written while offline")
    await expect(bob.msgs("written while offline")).to_have_attribute(
        "data-state", "queued", timeout=T
    )

    gb.start()  # the same port: bob's page finds it again by itself (backoff with jitter)
    await expect(bob.page.locator("#conn")).to_have_attribute(
        "data-state", "online", timeout=RECONNECT_T
    )
    # Backoff: a handful of attempts, each wait longer than the one before (jitter aside).
    attempts: list[float] = await bob.page.evaluate("window.__attempts")
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    assert 2 <= len(attempts) <= 12, attempts
    assert all(later > earlier * 0.9 for earlier, later in zip(gaps, gaps[1:], strict=False)), gaps
    everything = ["before", *missed, "written while offline"]
    await expect(bob.texts()).to_have_text(everything, timeout=T)
    await expect(alice.texts()).to_have_text(everything, timeout=T)
    await expect(bob.msgs("written while offline")).to_have_attribute(
        "data-state", "stored", timeout=T
    )
    await expect(alice.page.locator("#members li")).to_have_text(["alice (you)", "bob"], timeout=T)
    # Still exactly once each after everything settled (no late duplicate from a retry).
    await expect(alice.page.locator('#log li.msg.mine:not([data-state="stored"])')).to_have_count(0)
    assert await bob.texts().all_text_contents() == everything
    assert await alice.texts().all_text_contents() == everything
    alice.assert_clean()
    bob.assert_clean()


async def test_html_in_messages_is_shown_as_text(
    shared_stack: Stack, browser: Browser, room: str
) -> None:
    ga, gb = shared_stack.gateways
    alice = await open_chat(browser, ga, "alice", room)
    bob = await open_chat(browser, gb, "bob", room)
    payloads = [
        "<img src=x onerror=alert(1)>",
        "<script>alert(2)</script>",
        '<b>bold</b> &amp; "quotes" <a href="javascript:alert(3)">link</a>',
    ]
    for text in payloads:
        await alice.say(text)
    for chat in (alice, bob):
        await expect(chat.texts()).to_have_text(payloads, timeout=T)
        for tag in ("img", "script", "b", "a"):
            assert await chat.page.locator(f"#log {tag}").count() == 0, tag
        chat.assert_clean()
    # The DOM holds the characters, not markup.
    html = await bob.texts().first.inner_html()
    assert html == "&lt;img src=x onerror=alert(1)&gt;"


async def test_scrolling_up_loads_older_history_pages(
    shared_stack: Stack, browser: Browser, room: str
) -> None:
    g = shared_stack.gateway
    writer = await Client.open(g.ws_url, "carol")
    await writer.join(room)
    texts = [f"m{i:03d}" for i in range(120)]
    for i, text in enumerate(texts):
        await writer.send("chat.message", room=room, text=text, client_id=f"seed-{i}")
    await writer.wait(lambda _: len(writer.of("ack")) == len(texts), 30, "120 storage acks")

    reader = await open_chat(browser, g, "dave", room)
    page = reader.page
    await expect(reader.texts()).to_have_text(texts[-50:], timeout=T)  # the latest page
    for _ in range(10):  # 120 = 50 + 50 + 20: a few scrolls to the top, bounded
        if await page.locator("#topnote").text_content() == f"beginning of #{room}":
            break
        count = await reader.texts().count()
        await page.eval_on_selector("#scroller", "el => { el.scrollTop = 0; }")
        await page.wait_for_function(
            f"document.querySelectorAll('#log li.msg').length > {count}"
            f" || document.getElementById('topnote').textContent.startsWith('beginning')",
            timeout=T,
        )
    await expect(reader.texts()).to_have_text(texts, timeout=T)
    await expect(page.locator("#topnote")).to_have_text(f"beginning of #{room}")
    reader.assert_clean()


async def test_unread_counts_rooms_and_gateway_errors_are_shown(
    shared_stack: Stack, services: ServiceFactory, browser: Browser, room: str
) -> None:
    g = services("gateway", shared_stack.nats, history=False, TEXT_MAX=40)
    other = room + "b"
    chat = await open_chat(browser, g, "erin", room)
    page = chat.page
    # Join a second room from the form: it becomes the open one.
    await page.fill("#newroom", other)
    await page.press("#newroom", "Enter")
    await expect(
        page.locator(f'#rooms li[data-room="{other}"].active:not(.pending)')
    ).to_have_count(1, timeout=T)
    await expect(page.locator("#roomtitle")).to_have_text("#" + other)

    frank = await Client.open(g.ws_url, "frank")
    await frank.join(room)
    for text in ("one", "two"):
        await frank.send("chat.message", room=room, text=text)
    first_room = page.locator(f'#rooms li[data-room="{room}"]')
    await expect(first_room.locator(".unread")).to_have_text("2", timeout=T)
    await expect(chat.texts()).to_have_count(0)
    await first_room.click()
    await expect(first_room.locator(".unread")).to_have_count(0)
    await expect(chat.texts()).to_have_text(["one", "two"], timeout=T)

    # The gateway refuses a text over TEXT_MAX: the error is shown and the message marked.
    await chat.say("x" * 60)
    error = page.locator('#errors li[data-code="text_too_long"]')
    await expect(error).to_have_count(1, timeout=T)
    await expect(error.locator(".msgtext")).to_contain_text("40")
    await expect(chat.msgs("x" * 60)).to_have_attribute("data-state", "rejected", timeout=T)
    await error.locator("button").click()
    await expect(error).to_have_count(0)

    # A bad room name never reaches the wire; leaving removes the room from the list.
    await page.fill("#newroom", "no.dots")
    await page.press("#newroom", "Enter")
    await expect(page.locator('#errors li[data-code="bad_name"]')).to_have_count(1, timeout=T)
    await page.locator(f'#rooms li[data-room="{other}"] button.leave').click()
    await expect(page.locator("#rooms li")).to_have_count(1)
    chat.assert_clean()


async def test_signed_token_names_the_user_and_a_bad_token_stops_retrying(
    shared_stack: Stack, services: ServiceFactory, browser: Browser, room: str
) -> None:
    secret = "browser-test-secret-0123456789abcdef"
    g = services("gateway", shared_stack.nats, history=False, ROOMBUS_AUTH="jwt", JWT_SECRET=secret)
    token = jwt.encode({"sub": "grace", "exp": int(time.time()) + 600}, secret, algorithm="HS256")
    # The token rides in the fragment (never sent in a URL) and goes out in the `auth` frame.
    ctx = await browser.new_context()
    page = await ctx.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    await page.goto(f"{g.http}/?user=mallory&room={room}#token={token}", timeout=T)
    await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=T)
    await expect(page.locator("#me")).to_have_text("you are grace")
    await expect(page.locator("#name")).to_be_disabled()
    await expect(page.locator(f'#rooms li[data-room="{room}"]:not(.pending)')).to_have_count(
        1, timeout=T
    )
    await page.fill("#text", "signed")
    await page.press("#text", "Enter")
    mine = page.locator("#log li.msg.mine")
    await expect(mine).to_have_attribute("data-state", "stored", timeout=T)
    await expect(mine.locator(".who")).to_have_text("grace")

    bad = await ctx.new_page()
    await bad.goto(f"{g.http}/?room={room}#token=not-a-token", timeout=T)
    await expect(bad.locator("#conn")).to_have_attribute("data-state", "offline", timeout=T)
    await expect(bad.locator('#errors li[data-code="unauthorized"]')).to_have_count(1, timeout=T)
    await expect(bad.locator("#conn-detail")).to_have_text("closed 4001")
    assert page_errors == []


async def test_page_behind_a_load_balancer_fails_over_to_another_gateway_and_replays(
    shared_stack: Stack, services: ServiceFactory, browser: Browser, room: str
) -> None:
    # Gateways of its own (one is stopped) beside the shared history service.
    gateways = [services("gateway", shared_stack.nats, history=False) for _ in range(2)]
    async with Balancer([g.port for g in gateways]) as lb:
        ctx = await browser.new_context()
        page = await ctx.new_page()
        chat = Chat(page, "ivy")
        page.on("pageerror", lambda exc: chat.errors.append(str(exc)))
        await page.goto(f"{lb.http}/?user=ivy&room={room}", timeout=T)
        await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=T)
        await expect(page.locator(f'#rooms li[data-room="{room}"]:not(.pending)')).to_have_count(
            1, timeout=T
        )
        # Which gateway did the balancer pick? The other one keeps serving.
        counts = [g.metric("roombus_gateway_open_connections") for g in gateways]
        assert sorted(counts) == [0, 1], counts
        serving, survivor = (gateways[0], gateways[1]) if counts[0] else (gateways[1], gateways[0])
        jack = await Client.open(survivor.ws_url, "jack")
        await jack.join(room)
        await jack.send("chat.message", room=room, text="first", client_id="j0")
        await expect(chat.texts()).to_have_text(["first"], timeout=T)

        lb.closed = True  # no healthy backend for a while
        assert await asyncio.to_thread(serving.terminate) == 0
        await expect(page.locator("#conn")).to_have_attribute("data-state", "offline", timeout=T)
        for i in range(1, 4):
            await jack.send("chat.message", room=room, text=f"while away {i}", client_id=f"j{i}")
        await jack.wait(lambda _: len(jack.of("ack")) == 4, 20, "4 storage acks")

        lb.closed = False  # the balancer sends the retry to the surviving gateway
        await expect(page.locator("#conn")).to_have_attribute(
            "data-state", "online", timeout=RECONNECT_T
        )
        want = ["first", "while away 1", "while away 2", "while away 3"]
        await expect(chat.texts()).to_have_text(want, timeout=T)
        assert survivor.metric("roombus_gateway_open_connections") == 2
        await chat.say("back")
        await jack.wait_texts(["back"], room)
        await expect(chat.msgs("back")).to_have_attribute("data-state", "stored", timeout=T)
        assert await chat.texts().all_text_contents() == [*want, "back"]
        chat.assert_clean()
        await ctx.close()


@pytest.mark.slow  # waits out the idle timeout
async def test_a_reading_only_page_outlives_the_gateway_idle_timeout(
    shared_stack: Stack, services: ServiceFactory, browser: Browser, room: str
) -> None:
    # No presence service: the keepalive's presence queries fail, quietly.
    g = services("gateway", shared_stack.nats, history=False, IDLE_TIMEOUT=3)
    ctx = await browser.new_context()
    page = await ctx.new_page()
    await page.add_init_script(COUNT_SOCKETS)
    await page.goto(f"{g.http}/?user=kim&room={room}&keepalive=1", timeout=T)
    await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=T)
    # Five keepalives = well past the 3 s idle timeout with nothing typed.
    await asyncio.to_thread(
        wait_for,
        lambda: g.metric("roombus_gateway_frames_in_total", 'type="presence"') >= 5,
        30,
        "five keepalive frames",
    )
    await expect(page.locator("#conn")).to_have_attribute("data-state", "online")
    assert await page.evaluate("window.__attempts.length") == 1  # never reconnected
    assert g.metric("roombus_gateway_open_connections") == 1
    await expect(page.locator("#errors li")).to_have_count(0)
    await ctx.close()
