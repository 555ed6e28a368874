"""History: storage acks, idempotent retries, paging, replay with `since`, failures."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest

from tests.conftest import ServiceFactory
from tests.support.client import Client
from tests.support.procs import NatsServer, wait_for
from tests.support.stored import stored_messages


async def send_and_ack(c: Client, room: str, texts: list[str]) -> dict[str, str]:
    """Send each text with a client_id; wait for every ack; return client_id -> message id."""
    cids = {t: f"{c.user}-{uuid.uuid4().hex[:8]}" for t in texts}
    for t in texts:
        await c.send("chat.message", room=room, text=t, client_id=cids[t])
    want = set(cids.values())
    await c.wait(lambda _: want <= {a["data"]["client_id"] for a in c.of("ack")}, 30, "acks")
    return {a["data"]["client_id"]: a["data"]["id"] for a in c.of("ack")}


async def test_sender_is_acked_only_once_the_message_is_stored(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    services("history", nats_server)
    g = services("gateway", nats_server)
    c = await Client.open(g.ws_url, "alice")
    await c.join(room)
    acked = await send_and_ack(c, room, ["one", "two", "three"])
    stored = await stored_messages(nats_server.url, room)
    assert [m["text"] for m in stored] == ["one", "two", "three"]
    assert {m["id"] for m in stored} == set(acked.values())
    assert all(m["user"] == "alice" and m["room"] == room for m in stored)


async def test_without_history_service_a_send_is_reported_not_stored(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    g = services("gateway", nats_server, ACK_TIMEOUT=0.2, ACK_DEADLINE=1)
    c = await Client.open(g.ws_url, "alice")
    await c.join(room)
    await c.send("chat.message", room=room, text="into the void", client_id="v1")
    await c.wait_texts(["into the void"])  # live fan-out does not wait for storage
    err = await c.error("not_stored")
    assert err["data"]["client_id"] == "v1"
    assert c.of("ack") == []


async def test_resend_with_same_client_id_through_another_gateway_is_stored_once(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    services("history", nats_server)
    g1, g2 = services("gateway", nats_server), services("gateway", nats_server)
    watcher = await Client.open(g2.ws_url, "watcher")
    await watcher.join(room)
    first = await Client.open(g1.ws_url, "alice")
    await first.join(room)
    await first.send("chat.message", room=room, text="once", client_id="abc")
    ack1 = await first.next("ack", client_id="abc")
    await first.close()
    # The client reconnects elsewhere and resends: same id, no second copy anywhere.
    again = await Client.open(g2.ws_url, "alice")
    await again.join(room)
    await again.send("chat.message", room=room, text="once", client_id="abc")
    ack2 = await again.next("ack", client_id="abc")
    assert ack1["data"]["id"] == ack2["data"]["id"]
    await again.send("chat.message", room=room, text="marker")
    await watcher.wait_texts(["marker"])
    assert watcher.texts() == ["once", "marker"]
    stored = await stored_messages(nats_server.url, room)
    assert [m["text"] for m in stored] == ["once", "marker"]


async def test_history_pages_backwards_from_the_newest(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    services("history", nats_server)
    g = services("gateway", nats_server)
    c = await Client.open(g.ws_url, "pager")
    await c.join(room)
    texts = [f"m{i:02d}" for i in range(25)]
    await send_and_ack(c, room, texts)
    pages: list[list[str]] = []
    before = None
    while True:
        await c.send("history", room=room, limit=10, **({"before": before} if before else {}))
        page = (await c.next("history", room=room))["data"]
        pages.append([m["text"] for m in page["messages"]])
        if not page["has_more"]:
            break
        before = page["messages"][0]["id"]
    assert pages == [texts[15:], texts[5:15], texts[:5]]


async def test_rejoin_with_since_replays_exactly_the_missed_messages_then_live(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    services("history", nats_server)
    g1, g2 = services("gateway", nats_server), services("gateway", nats_server)
    sender = await Client.open(g1.ws_url, "sender")
    await sender.join(room)
    away = await Client.open(g2.ws_url, "away")
    await away.join(room)
    await send_and_ack(sender, room, ["seen"])
    await away.wait_texts(["seen"])
    last_seen = away.of("chat.message")[-1]["data"]["id"]
    await away.close()
    missed = [f"missed {i}" for i in range(200)]
    await send_and_ack(sender, room, missed)
    back = await Client.open(g2.ws_url, "away")
    await back.send("join", room=room, since=last_seen)
    await back.next("joined", room=room)
    await back.wait(lambda _: len(back.texts()) >= 200, 20, "200 replayed")
    await sender.send("chat.message", room=room, text="live again")
    await back.wait_texts(["live again"])
    assert back.texts() == [*missed, "live again"]


async def test_replay_merges_with_live_messages_sent_meanwhile(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    services("history", nats_server)
    g = services("gateway", nats_server)
    sender = await Client.open(g.ws_url, "sender")
    await sender.join(room)
    acked = await send_and_ack(sender, room, ["first"])
    since = next(iter(acked.values()))
    await send_and_ack(sender, room, [f"old {i}" for i in range(300)])
    back = await Client.open(g.ws_url, "back")
    # Live messages keep coming while the replay is read.
    await back.send("join", room=room, since=since)
    live = [f"live {i}" for i in range(50)]
    for t in live:
        await sender.send("chat.message", room=room, text=t)
    await back.wait(lambda _: len(back.texts()) >= 350, 30, "replay + live")
    got = back.texts()
    assert len(got) == len(set(got)) == 350
    assert got[:300] == [f"old {i}" for i in range(300)]
    assert [t for t in got if t.startswith("live")] == live


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "join", "data": {"room": "ROOM", "since": "not-an-id"}}, "bad_cursor"),
        ({"type": "history", "data": {"room": "ROOM", "limit": 1000}}, "invalid"),
        ({"type": "history", "data": {"room": "ROOM", "before": "x"}}, "bad_cursor"),
        ({"type": "history", "data": {"room": "OTHER"}}, "not_joined"),
        ({"type": "history", "data": {"room": "a.b"}}, "bad_name"),
    ],
)
async def test_bad_history_input_gets_a_clear_error(
    nats_server: NatsServer,
    services: ServiceFactory,
    room: str,
    frame: dict[str, object],
    code: str,
) -> None:
    import json

    services("history", nats_server)
    g = services("gateway", nats_server)
    c = await Client.open(g.ws_url, "x")
    await c.join(room)
    raw = json.dumps(frame).replace("OTHER", room + "z").replace("ROOM", room)
    await c.send_raw(raw)
    await c.error(code)
    await c.send("chat.message", room=room, text="still fine")
    await c.wait_texts(["still fine"])


async def test_since_older_than_retention_says_history_gap_and_replays_what_is_kept(
    fresh_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    services("history", fresh_nats, HISTORY_MAX_MSGS_PER_ROOM=5)
    g = services("gateway", fresh_nats)
    c = await Client.open(g.ws_url, "c")
    await c.join(room)
    acked = await send_and_ack(c, room, ["gone"])
    gone_id = next(iter(acked.values()))
    kept = [f"k{i}" for i in range(8)]
    await send_and_ack(c, room, kept)
    back = await Client.open(g.ws_url, "back")
    await back.send("join", room=room, since=gone_id)
    await back.error("history_gap")
    await back.wait(lambda _: len(back.texts()) >= 5, 10, "kept messages")
    assert back.texts() == kept[-5:]


@pytest.mark.slow
async def test_kill_9_of_one_history_replica_loses_nothing(
    fresh_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    h1 = services("history", fresh_nats)
    services("history", fresh_nats)
    g1, g2 = services("gateway", fresh_nats), services("gateway", fresh_nats)
    senders = [await Client.open(g.ws_url, f"s{i}") for i, g in enumerate((g1, g2, g1, g2))]
    for s in senders:
        await s.join(room)
    per_sender = 2500

    async def run(s: Client) -> None:
        for i in range(per_sender):
            await s.send("chat.message", room=room, text=f"{s.user} {i}", client_id=f"{s.user}-{i}")
            if i % 200 == 199:  # let acks catch up a little so the run spans the kill
                await s.wait(lambda _, n=i - 150: len(s.of("ack")) >= n, 60, "acks")

    async def killer() -> None:
        await senders[0].wait(lambda _: len(senders[0].of("ack")) >= 600, 60, "600 acks")
        h1.kill()

    await asyncio.gather(*(run(s) for s in senders), killer())
    for s in senders:
        await s.wait(lambda _, s=s: len(s.of("ack")) >= per_sender, 90, "all acks")
    total = per_sender * len(senders)
    for s in senders:
        acks = Counter(a["data"]["client_id"] for a in s.of("ack"))
        assert len(acks) == per_sender and set(acks.values()) == {1}
        assert s.of("error") == []
        # Fanned out once each, retries included.
        assert len(s.texts()) == len(set(s.texts())) == total
    stored = await stored_messages(fresh_nats.url, room)
    assert len(stored) == total
    assert len({m["id"] for m in stored}) == total
    acked_ids = {a["data"]["id"] for s in senders for a in s.of("ack")}
    assert acked_ids == {m["id"] for m in stored}
    retries = sum(g.metric("roombus_gateway_published_total", 'kind="retry"') for g in (g1, g2))
    print(f"kill -9 of a history replica: {total} sent, {len(stored)} stored, {retries} retries")


@pytest.mark.slow
async def test_nats_restart_mid_run_keeps_clients_and_stores_everything(
    fresh_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    h = services("history", fresh_nats)
    g1, g2 = services("gateway", fresh_nats), services("gateway", fresh_nats)
    a, b = await Client.open(g1.ws_url, "a"), await Client.open(g2.ws_url, "b")
    await a.join(room)
    await b.join(room)
    before = await send_and_ack(a, room, [f"before {i}" for i in range(100)])
    fresh_nats.stop()
    wait_for(lambda: not g1.ready() and not h.ready(), 15, "NATS down seen")
    # Sent while the broker is away: buffered, retried, acked after recovery.
    during = [f"during {i}" for i in range(20)]
    for t in during:
        await b.send("chat.message", room=room, text=t, client_id=t)
    fresh_nats.start()
    wait_for(lambda: g1.ready() and g2.ready() and h.ready(), 30, "all reconnected")
    after = await send_and_ack(a, room, [f"after {i}" for i in range(100)])
    await b.wait(lambda _: set(during) <= {x["data"]["client_id"] for x in b.of("ack")}, 40, "acks")
    assert a.closed is None and b.closed is None
    stored = await stored_messages(fresh_nats.url, room)
    texts = [m["text"] for m in stored]
    assert len(texts) == len(set(texts)) == 220
    assert set(before.values()) | set(after.values()) <= {m["id"] for m in stored}
    assert set(during) <= set(texts)


async def test_history_service_health_metrics_and_clean_sigterm(
    nats_server: NatsServer, services: ServiceFactory, room: str
) -> None:
    import httpx

    h = services("history", nats_server)
    g = services("gateway", nats_server)
    c = await Client.open(g.ws_url, "m")
    await c.join(room)
    await send_and_ack(c, room, ["counted"])
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(f"{h.http}/healthz")).json() == {"status": "ok"}
        assert (await http.get(f"{h.http}/readyz")).status_code == 200
    assert h.metric("roombus_history_stored_total") >= 1
    assert '"level"' in h.log()  # structured JSON lines
    assert h.terminate() == 0
