"""Per-user channels (DMs), broadcast event channels, SSE with Last-Event-ID, the HTTP API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats
import pytest

from tests.conftest import ServiceFactory, Stack
from tests.support.client import Client
from tests.support.procs import ServiceProc
from tests.support.stored import stored_messages

API_KEY = "k-" + "x" * 30


def dms(c: Client) -> list[str]:
    return [f["data"]["text"] for f in c.frames if f["type"] == "dm"]


async def test_a_dm_reaches_every_tab_of_both_parties_and_no_one_else(shared_stack: Stack) -> None:
    g1, g2 = shared_stack.gateways
    bob_tab1, bob_tab2 = await Client.open(g1.ws_url, "bob"), await Client.open(g2.ws_url, "bob")
    alice_tab1 = await Client.open(g1.ws_url, "alice")
    alice_tab2 = await Client.open(g2.ws_url, "alice")
    carol = await Client.open(g2.ws_url, "carol")
    await alice_tab1.send("dm", to="bob", text="psst", client_id="d1")
    await alice_tab1.next("ack", client_id="d1")
    for c in (bob_tab1, bob_tab2, alice_tab1, alice_tab2):
        await c.wait(lambda _, c=c: dms(c) == ["psst"], 10, "the dm")
    dm = next(f for f in bob_tab2.frames if f["type"] == "dm")["data"]
    assert dm["from"] == "alice" and dm["to"] == "bob"
    # Carol saw nothing: a DM to her afterwards arrives alone.
    await bob_tab1.send("dm", to="carol", text="hi carol")
    await carol.wait(lambda _: dms(carol) == ["hi carol"], 10, "carol's own dm")


async def test_dms_are_stored_and_each_user_reads_only_their_own(shared_stack: Stack) -> None:
    g = shared_stack.gateway
    dave, erin, frank = [await Client.open(g.ws_url, u) for u in ("dave", "erin", "frank")]
    for i in range(3):
        await dave.send("dm", to="erin", text=f"d->e {i}", client_id=f"de{i}")
        await erin.send("dm", to="dave", text=f"e->d {i}", client_id=f"ed{i}")
    await dave.wait(lambda _: len(dave.of("ack")) == 3, 10, "acks")
    await erin.wait(lambda _: len(erin.of("ack")) == 3, 10, "acks")
    await frank.send("dm", to="dave", text="f->d", client_id="fd")
    await frank.next("ack", client_id="fd")
    await erin.send("dm.history", limit=100)
    page = (await erin.next("dm.history"))["data"]
    texts = [m["text"] for m in page["messages"]]
    assert sorted(texts) == sorted(
        [f"d->e {i}" for i in range(3)] + [f"e->d {i}" for i in range(3)]
    )
    assert "f->d" not in texts  # frank wrote to dave, not to erin
    await frank.send("dm.history", limit=100)
    assert [m["text"] for m in (await frank.next("dm.history"))["data"]["messages"]] == ["f->d"]
    # Each inbox copy has its own seq; replay after one: what came later, in order.
    seqs = [m["seq"] for m in page["messages"]]
    assert seqs == sorted(seqs) and [m["prev"] for m in page["messages"][1:]] == seqs[:-1]
    await erin.send("dm.history", after=seqs[0], limit=100)
    later = (await erin.next("dm.history"))["data"]["messages"]
    assert [m["id"] for m in later] == [m["id"] for m in page["messages"][1:]]
    # Live DMs carry the seq of the receiving user's inbox, linked by prev.
    live = [f["data"] for f in erin.frames if f["type"] == "dm"]
    assert [m["seq"] for m in live] == seqs
    assert [m["prev"] for m in live[1:]] == seqs[:-1]


async def test_nats_pub_event_reaches_subscribers_only(shared_stack: Stack) -> None:
    g = shared_stack.gateway
    sub, other = await Client.open(g.ws_url, "sub"), await Client.open(g.ws_url, "other")
    await sub.send("subscribe", events=["order.created"])
    assert (await sub.next("subscribed"))["data"]["events"] == ["order.created"]
    await other.send("subscribe", events=["order.shipped"])
    await other.next("subscribed")
    async with httpx.AsyncClient(timeout=10) as http:
        async with http.stream("GET", f"{g.http}/sse?events=order.created&user=watch") as sse:
            lines = sse.aiter_lines()
            assert await anext(lines) == "retry: 2000"
            nc = await nats.connect(shared_stack.nats.url)
            await nc.publish("event.order.created", b'{"order": 42}')
            await nc.publish("event.order.shipped", b'{"order": 41}')
            await nc.publish("event.order.created", b"not json")  # dropped
            await nc.flush()
            event = await _next_data(lines)
            assert event == {
                "type": "event",
                "data": {"event": "order.created", "payload": {"order": 42}},
            }
            await nc.close()
    await sub.next("event", event="order.created")
    await other.next("event", event="order.shipped")
    assert sub.of("event") == [] and other.of("event") == []
    await sub.send("unsubscribe", events=["order.created"])
    assert (await sub.next("unsubscribed"))["data"]["events"] == []
    await sub.send("subscribe", events=["bad..type"])
    await sub.error("bad_name")


async def _next_data(lines: AsyncIterator[str]) -> dict[str, Any]:
    async for line in lines:
        if line.startswith("data: "):
            frame: dict[str, Any] = json.loads(line[6:])
            if frame["type"] != "presence":
                return frame
    raise AssertionError("stream ended")


async def _read_sse(
    gw: ServiceProc,
    room: str,
    want: int,
    connected: asyncio.Event,
    last_id: str | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """Read ``want`` chat messages from /sse as an EventSource would; (id, frame) pairs.
    ``room`` may list several rooms (``a,b``); ``connected`` is set once all are joined."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    out: list[tuple[str, dict[str, Any]]] = []
    rooms = set(room.split(","))
    async with httpx.AsyncClient(timeout=20) as http:
        async with http.stream("GET", f"{gw.http}/sse?rooms={room}&user=es", headers=headers) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            event_id = None
            async for line in r.aiter_lines():
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: "):
                    frame = json.loads(line[6:])
                    if frame["type"] == "joined":
                        rooms.discard(frame["data"]["room"])
                        if not rooms:
                            connected.set()
                    if frame["type"] == "chat.message":
                        if "," not in room:
                            assert event_id == str(frame["data"]["seq"])
                        else:
                            assert f"{frame['data']['room']}:{frame['data']['seq']}" in str(
                                event_id
                            )
                        out.append((str(event_id), frame))
                        if len(out) == want:
                            return out
                    event_id = None
    return out


async def test_eventsource_reconnect_with_last_event_id_gets_exactly_what_it_missed(
    shared_stack: Stack, room: str
) -> None:
    g = shared_stack.gateway
    sender = await Client.open(g.ws_url, "sender")
    await sender.join(room)
    connected = asyncio.Event()
    reader = asyncio.create_task(_read_sse(g, room, 1, connected))
    await asyncio.wait_for(connected.wait(), 10)
    await sender.send("chat.message", room=room, text="seen", client_id="seen")
    await sender.next("ack", client_id="seen")
    seen = await asyncio.wait_for(reader, 10)  # the stream closes: the client went away
    last_id = seen[0][0]
    missed = [f"missed {i}" for i in range(50)]
    for t in missed:
        await sender.send("chat.message", room=room, text=t, client_id=t)
    await sender.wait(
        lambda _: {a["data"]["client_id"] for a in sender.of("ack")} >= set(missed), 20, "acks"
    )
    connected = asyncio.Event()
    back = asyncio.create_task(_read_sse(g, room, 51, connected, last_id))
    await asyncio.wait_for(connected.wait(), 10)
    await sender.send("chat.message", room=room, text="live")
    got = await asyncio.wait_for(back, 20)
    assert [f["data"]["text"] for _, f in got] == [*missed, "live"]


async def test_eventsource_over_two_rooms_resumes_each_room_exactly(
    shared_stack: Stack, room: str
) -> None:
    """With several rooms the event id is every room's position (``a:12,b:40``)."""
    g = shared_stack.gateway
    a, b = f"{room}a", f"{room}b"
    sender = await Client.open(g.ws_url, "sender")
    await sender.join(a)
    await sender.join(b)
    connected = asyncio.Event()
    reader = asyncio.create_task(_read_sse(g, f"{a},{b}", 2, connected))
    await asyncio.wait_for(connected.wait(), 10)
    for r in (a, b):
        await sender.send("chat.message", room=r, text=f"seen {r}", client_id=f"seen{r}")
        await sender.next("ack", client_id=f"seen{r}")
    seen = await asyncio.wait_for(reader, 10)
    last_id = seen[-1][0]
    missed = [(r, f"missed {r} {i}") for i in range(20) for r in (a, b)]
    for r, t in missed:
        await sender.send("chat.message", room=r, text=t, client_id=t)
    await sender.wait(
        lambda _: {a["data"]["client_id"] for a in sender.of("ack")} >= {t for _, t in missed},
        20,
        "acks",
    )
    connected = asyncio.Event()
    back = asyncio.create_task(_read_sse(g, f"{a},{b}", 40, connected, last_id))
    got = await asyncio.wait_for(back, 20)
    for r in (a, b):
        texts = [f["data"]["text"] for _, f in got if f["data"]["room"] == r]
        assert texts == [t for rr, t in missed if rr == r]


async def test_http_publish_api(shared_stack: Stack, services: ServiceFactory, room: str) -> None:
    g = services("gateway", shared_stack.nats, history=False, API_KEYS=f"other,{API_KEY}")
    c = await Client.open(g.ws_url, "reader")
    await c.join(room)
    url = f"{g.http}/api/rooms/{room}/messages"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.post(url, json={"user": "ops", "text": "x"})).status_code == 401
        r = await http.post(
            url, json={"user": "ops", "text": "x"}, headers={"Authorization": "Bearer nope"}
        )
        assert r.status_code == 403
        r = await http.post(
            f"{g.http}/api/rooms/a.b/messages", json={"user": "ops", "text": "x"}, headers=auth
        )
        assert r.status_code == 400 and r.json()["code"] == "bad_name"
        r = await http.post(url, json={"user": "o p s", "text": "x"}, headers=auth)
        assert r.status_code == 400 and r.json()["code"] == "invalid"
        r = await http.post(url, content=b"{nope", headers=auth)
        assert r.status_code == 400
        r = await http.post(url, json={"user": "ops", "text": "from a backend"}, headers=auth)
        assert r.status_code == 201
        msg_id = r.json()["id"]
        r = await http.post(
            f"{g.http}/api/users/reader/messages", json={"text": "ping"}, headers=auth
        )
        assert r.status_code == 201
        r = await http.post(f"{g.http}/api/events/build.done", json={"ok": True}, headers=auth)
        assert r.status_code == 202 and r.json()["id"]
        r = await http.post(f"{g.http}/api/events/build..x", json={}, headers=auth)
        assert r.status_code == 400 and r.json()["code"] == "bad_name"
    await c.wait_texts(["from a backend"])
    assert c.of("chat.message")[0]["data"]["id"] == msg_id
    await c.wait(lambda _: dms(c) == ["ping"], 10, "notification")
    assert next(f for f in c.frames if f["type"] == "dm")["data"]["from"] == "system"
    stored = await stored_messages(shared_stack.nats.url, room)
    assert [m["id"] for m in stored] == [msg_id]
    assert c.of("chat.message")[0]["data"]["seq"] == stored[0]["seq"]


@pytest.mark.parametrize("query", ["rooms=a.b", "events=x..y", "rooms=ok&last_event_id=nope"])
async def test_sse_rejects_bad_names_and_cursors(shared_stack: Stack, query: str) -> None:
    g = shared_stack.gateway
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{g.http}/sse?{query}")
    assert r.status_code == 400
    assert r.json()["code"] in {"bad_name", "bad_cursor"}
