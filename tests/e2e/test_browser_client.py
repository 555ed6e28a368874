"""/roombus.js in Chromium: the chat page offline and back (what others sent meanwhile shown
once, in order; a send made while offline acked and stored once), and the module on its own
through a gateway restart (it moves to the next URL) and an expired token refreshed through
its callback."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest

from tests.conftest import ServiceFactory, Stack
from tests.e2e.test_browser import COUNT_SOCKETS, Chat, T
from tests.support.client import Client
from tests.support.stored import stored_messages
from tests.support.tcpproxy import TcpProxy

try:
    from playwright.async_api import Browser, Page, expect
except ImportError:
    pytest.skip("the Python package playwright is missing", allow_module_level=True)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(480)]

# Count the ack frames the page receives, per client_id (the module resolves a send once).
COUNT_ACKS = COUNT_SOCKETS + (
    "window.__acks = {}; const Base = window.WebSocket;"
    "window.WebSocket = class extends Base { constructor(...a) { super(...a);"
    " this.addEventListener('message', (e) => { const f = JSON.parse(e.data);"
    " if (f.type === 'ack') window.__acks[f.data.client_id] ="
    " (window.__acks[f.data.client_id] || 0) + 1; }); } };"
)

MODULE = """async ([urls, room, opts]) => {
  const { Client } = await import("/roombus.js");
  window.__got = []; window.__states = []; window.__calls = 0;
  if (opts.tokens) {
    const tokens = opts.tokens; delete opts.tokens;
    opts.tokenProvider = async () => tokens[Math.min(window.__calls++, tokens.length - 1)];
  }
  const c = window.__c = new Client(urls, opts);
  c.addEventListener("message", (e) => window.__got.push([e.detail.seq, e.detail.text]));
  c.addEventListener("state", (e) => {
    window.__states.push(`${e.detail.state}:${e.detail.code || ""}`);
  });
  await c.join(room);
  return c.url;
}"""


async def got(page: Page) -> list[list[object]]:
    result: list[list[object]] = await page.evaluate("window.__got")
    return result


async def wait_js(page: Page, expr: str, timeout: float = T) -> None:
    await page.wait_for_function(expr, timeout=timeout)


async def test_page_offline_then_online_shows_what_others_sent_once_and_acks_its_send_once(
    shared_stack: Stack, browser: Browser, room: str
) -> None:
    g = shared_stack.gateway
    proxy = await TcpProxy(g.port).start()  # the page's network
    try:
        ctx = await browser.new_context()
        page = await ctx.new_page()
        chat = Chat(page, "nia")
        page.on("pageerror", lambda exc: chat.errors.append(str(exc)))
        await page.add_init_script(COUNT_ACKS)
        await page.goto(f"http://127.0.0.1:{proxy.port}/?user=nia&room={room}", timeout=T)
        await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=T)
        omar = await Client.open(g.ws_url, "omar")
        await omar.join(room)
        await omar.send("chat.message", room=room, text="before", client_id="o0")
        await expect(chat.texts()).to_have_text(["before"], timeout=T)

        await ctx.set_offline(True)
        proxy.cut()
        await expect(page.locator("#conn")).to_have_attribute("data-state", "offline", timeout=T)
        meanwhile = [f"meanwhile {i}" for i in range(1, 6)]
        for i, text in enumerate(meanwhile, 1):
            await omar.send("chat.message", room=room, text=text, client_id=f"o{i}")
        await chat.say("written offline")
        await expect(chat.msgs("written offline")).to_have_attribute("data-state", "queued")
        await omar.wait(lambda _: len(omar.of("ack")) == 6, 20, "6 acks")

        proxy.restore()
        await ctx.set_offline(False)  # the `online` event: the page reconnects at once
        await expect(page.locator("#conn")).to_have_attribute("data-state", "online", timeout=T)
        everything = ["before", *meanwhile, "written offline"]
        await expect(chat.texts()).to_have_text(everything, timeout=T)
        await expect(chat.msgs("written offline")).to_have_attribute(
            "data-state", "stored", timeout=T
        )
        await omar.wait_texts(["written offline"], room)
        await asyncio.sleep(1.0)  # a late duplicate would show now
        assert await chat.texts().all_text_contents() == everything
        stored = [m["text"] for m in await stored_messages(shared_stack.nats.url, room)]
        assert stored == everything  # the offline send stored once, after the others
        acks: dict[str, int] = await page.evaluate("window.__acks")
        cid = await chat.msgs("written offline").get_attribute("data-client-id")
        assert acks.get(str(cid), 0) >= 1
        chat.assert_clean()
        await ctx.close()
    finally:
        await proxy.stop()


async def test_module_moves_to_the_next_gateway_on_restart_and_misses_nothing(
    shared_stack: Stack, services: ServiceFactory, browser: Browser, room: str
) -> None:
    # Gateways of its own (one is stopped) beside the shared history service.
    ga, gb = (services("gateway", shared_stack.nats, history=False) for _ in range(2))
    page = await browser.new_page()
    await page.goto(f"{ga.http}/healthz", timeout=T)
    urls = [f"ws://127.0.0.1:{ga.port}/ws", f"ws://127.0.0.1:{gb.port}/ws"]
    assert await page.evaluate(MODULE, [urls, room, {"user": "pia"}]) == urls[0]
    sender = await Client.open(gb.ws_url, "quin")
    await sender.join(room)
    texts = [f"m{i}" for i in range(30)]
    for i, text in enumerate(texts[:10]):
        await sender.send("chat.message", room=room, text=text, client_id=f"q{i}")
    await wait_js(page, "window.__got.length === 10")
    await page.evaluate("(r) => { window.__sent = window.__c.send(r, 'from pia'); }", room)
    stopping = asyncio.create_task(asyncio.to_thread(ga.terminate))  # close 1012: next URL
    for i, text in enumerate(texts[10:], 10):
        await sender.send("chat.message", room=room, text=text, client_id=f"q{i}")
        await asyncio.sleep(0.05)
    assert await stopping == 0
    await wait_js(page, f"window.__c.url === {urls[1]!r} && window.__c.online")
    await wait_js(page, "window.__got.length === 31")
    ack = await page.evaluate("window.__sent")
    stored = await stored_messages(shared_stack.nats.url, room)
    assert len(stored) == 31 and ack["seq"] in {m["seq"] for m in stored}
    assert await got(page) == [[m["seq"], m["text"]] for m in stored]  # once, in stream order
    states: list[str] = await page.evaluate("window.__states")
    assert "offline:1012" not in states  # reconnected at once, no backoff wait
    ga.start()
    await page.close()


async def test_module_refreshes_an_expired_token_through_its_callback(
    shared_stack: Stack, services: ServiceFactory, browser: Browser, room: str
) -> None:
    secret = "browser-client-secret-0123456789abcdef"
    g = services("gateway", shared_stack.nats, history=False, ROOMBUS_AUTH="jwt", JWT_SECRET=secret)
    now = int(time.time())
    tokens = [
        jwt.encode({"sub": "rae", "exp": now + 3}, secret, algorithm="HS256"),
        jwt.encode({"sub": "rae", "exp": now + 600}, secret, algorithm="HS256"),
    ]
    page = await browser.new_page()
    await page.goto(f"{g.http}/healthz", timeout=T)
    url = f"ws://127.0.0.1:{g.port}/ws"
    await page.evaluate(MODULE, [[url], room, {"tokens": tokens}])
    await wait_js(page, "window.__c.me === 'rae'")
    # The first token expires: the gateway closes 4002, the module asks for a new one.
    await wait_js(page, "window.__calls === 2 && window.__c.online && window.__c.connects === 2")
    ack = await page.evaluate("(r) => window.__c.send(r, 'after the refresh')", room)
    assert ack["seq"] > 0
    await wait_js(page, "window.__got.some(([, t]) => t === 'after the refresh')")
    states: list[str] = await page.evaluate("window.__states")
    assert "stopped:4002" not in states and any(s.startswith("online") for s in states)
    await page.close()
