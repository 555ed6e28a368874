"""The Python client (clients/python, ``roombus_client``) against the real stack: every message
once, in stream order, and every send acked once — across a gateway kill -9, a broker restart
and a 10 s network cut between the client and its gateway."""

from __future__ import annotations

import asyncio
import time

import jwt
import nats
import pytest
from roombus_client import Ack, ChatMessage, Client, NotRecovered, Room, SendRefused, Unauthorized

from tests.conftest import ServiceFactory, Stack
from tests.support.procs import NatsServer
from tests.support.stored import stored_messages

pytestmark = pytest.mark.timeout(240)


def ws(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws"


async def collect(room: Room, out: list[ChatMessage], gaps: list[NotRecovered]) -> None:
    """The consumer: ``async for`` forever, noting any NotRecovered (there must be none)."""
    while True:
        try:
            async for msg in room:
                out.append(msg)
        except NotRecovered as exc:
            gaps.append(exc)


async def produce(room: Room, who: str, n: int, pace: float) -> list[Ack]:
    """``n`` sends, one every ``pace`` seconds, each awaited in its own task (so sends made
    while disconnected wait in the client's outbox)."""
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(room.send(f"{who}-{i}", timeout=150)))
        await asyncio.sleep(pace)
    return list(await asyncio.gather(*tasks))


async def wait_until(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_send_receive_history_presence_typing_dm_and_events(
    shared_presence_stack: Stack, services: ServiceFactory, room: str
) -> None:
    g = services("gateway", shared_presence_stack.nats, history=False, TEXT_MAX=40)
    async with (
        Client(ws(g.port), user="ann") as a,
        Client([ws(g.port)], user="ben") as b,
    ):
        ra, rb = await a.join(room), await b.join(room)
        acks = [await ra.send(f"m{i}") for i in range(5)]
        assert all(x.seq for x in acks) and len({x.id for x in acks}) == 5
        got: list[ChatMessage] = []
        async for msg in rb:
            got.append(msg)
            if len(got) == 5:
                break
        assert [m.text for m in got] == [f"m{i}" for i in range(5)]
        assert [m.seq for m in got] == [x.seq for x in acks]
        assert [m.prev for m in got[1:]] == [m.seq for m in got[:-1]]
        older = [m.text async for m in rb.history(limit=2)]
        assert older == [f"m{i}" for i in reversed(range(5))]  # newest first, 3 pages
        assert set((await rb.presence()).members) >= {"ann", "ben"}
        await ra.typing()
        async for sig in rb.signals():
            if getattr(sig, "user", None) == "ann" and type(sig).__name__ == "Typing":
                break
        with pytest.raises(SendRefused) as refused:
            await ra.send("x" * 60, timeout=10)
        assert refused.value.code == "text_too_long"
    async with Client(ws(g.port), user="cat") as c, Client(ws(g.port), user="dan") as d:
        ack = await c.dm("dan", "psst")
        async for dm in d.direct_messages():
            assert (dm.sender, dm.text, dm.id) == ("cat", "psst", ack.id)
            break
        events = await d.subscribe(["order.created"])
        nc = await nats.connect(shared_presence_stack.nats.url)
        try:
            for _ in range(50):  # the subscription reaches the gateway asynchronously
                await nc.publish("event.order.created", b'{"order": 42}')
                try:
                    ev = await asyncio.wait_for(anext(events), 0.2)
                    break
                except TimeoutError:
                    continue
            assert (ev.event, ev.payload) == ("order.created", {"order": 42})
        finally:
            await nc.close()


async def test_a_send_refused_as_unavailable_is_resent_until_stored(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    h = services("history", nats_server)
    g = services("gateway", nats_server, ACK_DEADLINE=2)
    async with Client(ws(g.port), user="eve") as c:
        r = await c.join(room)
        assert h.terminate() == 0  # storage goes away: sends are refused `unavailable`
        sending = asyncio.create_task(r.send("while storage was away", timeout=60))
        await wait_until(lambda: c.resends >= 2, 20, "resends after refusals")
        services("history", nats_server)
        ack = await sending
        assert ack.seq is not None
    stored = await stored_messages(nats_server.url, room)
    assert [m["text"] for m in stored] == ["while storage was away"]


async def test_expired_token_is_refreshed_through_the_provider(
    shared_stack: Stack, services: ServiceFactory, room: str
) -> None:
    secret = "client-test-secret-0123456789abcdef"
    # No leeway: a token expires at its exp (the default 5 s would add 10 s to the test).
    g = services(
        "gateway",
        shared_stack.nats,
        history=False,
        ROOMBUS_AUTH="jwt",
        JWT_SECRET=secret,
        JWT_LEEWAY=0,
    )
    calls: list[float] = []

    def fresh() -> str:
        calls.append(time.time())
        exp = int(time.time()) + (2 if len(calls) == 1 else 600)
        return jwt.encode({"sub": "fay", "exp": exp}, secret, algorithm="HS256")

    async with Client(ws(g.port), token_provider=fresh) as c:
        r = await c.join(room)
        await wait_until(lambda: c.connects >= 2, 20, "a reconnect with a fresh token")
        ack = await r.send("after the refresh", timeout=20)
        assert ack.seq is not None and len(calls) == 2 and c.me == "fay"
    # Without a provider an expired token stops the client with Unauthorized.
    short = jwt.encode({"sub": "gus", "exp": int(time.time()) + 2}, secret, algorithm="HS256")
    async with Client(ws(g.port), token=short) as c:
        r = await c.join(room)
        with pytest.raises(Unauthorized) as stopped:
            async for _ in r:
                pass
        assert stopped.value.code == 4002
