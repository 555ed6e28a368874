"""History and the one order: storage acks, idempotent retries, paging and replay by `seq`."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter

import nats
import pytest

from proto.ids import is_id
from tests.conftest import ServiceFactory, Stack
from tests.support.client import Client
from tests.support.procs import NatsServer, wait_for
from tests.support.stored import stored_messages


async def send_and_ack(c: Client, room: str, texts: list[str]) -> dict[str, dict[str, object]]:
    """Send each text with a client_id; wait for every ack; return client_id -> ack data."""
    cids = {t: f"{c.user}-{uuid.uuid4().hex[:8]}" for t in texts}
    for t in texts:
        await c.send("chat.message", room=room, text=t, client_id=cids[t])
    want = set(cids.values())
    await c.wait(lambda _: want <= {a["data"]["client_id"] for a in c.of("ack")}, 30, "acks")
    return {a["data"]["client_id"]: a["data"] for a in c.of("ack")}


def seqs(c: Client, room: str) -> list[int]:
    return [f["data"]["seq"] for f in c.of("chat.message") if f["data"]["room"] == room]


def assert_one_order(c: Client, room: str, start: int, stored: list[dict[str, object]]) -> None:
    """``c`` saw exactly the stored messages after ``start``, in stream order, each once,
    with unbroken ``prev`` links."""
    msgs = [f["data"] for f in c.of("chat.message") if f["data"]["room"] == room]
    expected = [m["seq"] for m in stored if int(str(m["seq"])) > start]
    got = [m["seq"] for m in msgs]
    assert got == expected, f"{c.user}: {len(got)} seen vs {len(expected)} stored after {start}"
    prev = start
    for m in msgs:
        assert m["prev"] == prev, f"{c.user}: broken prev link at seq {m['seq']}"
        prev = m["seq"]


async def test_sender_is_acked_only_once_the_message_is_stored(
    shared_stack: Stack, room: str
) -> None:
    g = shared_stack.gateway
    c = await Client.open(g.ws_url, "alice")
    await c.join(room)
    acked = await send_and_ack(c, room, ["one", "two", "three"])
    stored = await stored_messages(shared_stack.nats.url, room)
    assert [m["text"] for m in stored] == ["one", "two", "three"]
    assert {m["id"] for m in stored} == {a["id"] for a in acked.values()}
    assert {m["seq"] for m in stored} == {a["seq"] for a in acked.values()}
    assert all(m["user"] == "alice" and m["room"] == room for m in stored)
    # Live copies come after storage, with the stored seq.
    await c.wait(lambda _: len(seqs(c, room)) == 3, 10, "3 delivered")
    assert seqs(c, room) == [m["seq"] for m in stored]


async def test_without_history_service_a_send_is_refused_within_a_second(
    fresh_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    h = services("history", fresh_nats)  # creates the stream, then goes away
    g = services("gateway", fresh_nats)
    assert h.terminate() == 0
    c = await Client.open(g.ws_url, "alice")
    await c.join(room)  # joining reads the stream, which needs no history service
    loop = asyncio.get_running_loop()
    started = loop.time()
    await c.send("chat.message", room=room, text="into the void", client_id="v1")
    err = await c.error("unavailable", timeout=10)
    # A generous bound: "at once", not after the 30 s retry ladder.
    assert loop.time() - started < 5
    assert err["data"]["client_id"] == "v1"
    assert c.of("ack") == [] and c.texts(room) == []  # nothing is shown that is not stored


async def test_resend_with_same_client_id_through_another_gateway_is_stored_once(
    shared_stack: Stack, room: str
) -> None:
    g1, g2 = shared_stack.gateways
    watcher = await Client.open(g2.ws_url, "watcher")
    await watcher.join(room)
    first = await Client.open(g1.ws_url, "alice")
    await first.join(room)
    await first.send("chat.message", room=room, text="once", client_id="abc")
    ack1 = await first.next("ack", client_id="abc")
    await first.close()
    # The client reconnects elsewhere and resends: same id and seq, no second copy anywhere.
    again = await Client.open(g2.ws_url, "alice")
    await again.join(room)
    await again.send("chat.message", room=room, text="once", client_id="abc")
    ack2 = await again.next("ack", client_id="abc")
    assert (ack1["data"]["id"], ack1["data"]["seq"]) == (ack2["data"]["id"], ack2["data"]["seq"])
    await again.send("chat.message", room=room, text="marker")
    await watcher.wait_texts(["marker"])
    assert watcher.texts() == ["once", "marker"]
    stored = await stored_messages(shared_stack.nats.url, room)
    assert [m["text"] for m in stored] == ["once", "marker"]


async def test_history_pages_backwards_from_the_newest(shared_stack: Stack, room: str) -> None:
    g = shared_stack.gateway
    other = await Client.open(g.ws_url, "noise")
    await other.join(room + "x")
    c = await Client.open(g.ws_url, "pager")
    await c.join(room)
    texts = [f"m{i:02d}" for i in range(25)]
    for t in texts:  # interleaved with another room's messages: seqs are not contiguous
        await send_and_ack(c, room, [t])
        await send_and_ack(other, room + "x", [t])
    pages: list[list[str]] = []
    before = None
    while True:
        await c.send("history", room=room, limit=10, **({"before": before} if before else {}))
        page = (await c.next("history", room=room))["data"]
        pages.append([m["text"] for m in page["messages"]])
        got = [m["seq"] for m in page["messages"]]
        assert got == sorted(got) and all(m["prev"] < m["seq"] for m in page["messages"])
        if not page["has_more"]:
            break
        before = page["messages"][0]["seq"]
    assert pages == [texts[15:], texts[5:15], texts[:5]]


async def test_rejoin_with_since_replays_exactly_the_missed_messages_then_live(
    shared_stack: Stack, room: str
) -> None:
    g1, g2 = shared_stack.gateways
    sender = await Client.open(g1.ws_url, "sender")
    await sender.join(room)
    away = await Client.open(g2.ws_url, "away")
    joined = await away.join(room)
    await send_and_ack(sender, room, ["seen"])
    await away.wait_texts(["seen"])
    last_seen = away.of("chat.message")[-1]["data"]["seq"]
    await away.close()
    missed = [f"missed {i}" for i in range(200)]
    await send_and_ack(sender, room, missed)
    back = await Client.open(g2.ws_url, "away")
    await back.send("join", room=room, since=last_seen, epoch=joined["data"]["epoch"])
    rejoined = await back.next("joined", room=room)
    assert rejoined["data"]["recovered"] is True and rejoined["data"]["seq"] == last_seen
    await back.wait(lambda _: len(back.texts()) >= 200, 20, "200 replayed")
    await sender.send("chat.message", room=room, text="live again")
    await back.wait_texts(["live again"])
    assert back.texts() == [*missed, "live again"]
    assert_one_order(back, room, last_seen, await stored_messages(shared_stack.nats.url, room))


async def test_replay_merges_with_live_messages_sent_meanwhile(
    shared_stack: Stack, services: ServiceFactory, room: str
) -> None:
    g = services("gateway", shared_stack.nats, history=False, REPLAY_BUFFER=100)
    sender = await Client.open(g.ws_url, "sender")
    await sender.join(room)
    since = next(iter((await send_and_ack(sender, room, ["first"])).values()))["seq"]
    await send_and_ack(sender, room, [f"old {i}" for i in range(1500)])
    back = await Client.open(g.ws_url, "back")
    # Live messages keep coming while the replay is read: more than the held-back bound
    # (REPLAY_BUFFER=100), so some are read again from the stream instead of kept.
    await back.send("join", room=room, since=since)
    live = [f"live {i}" for i in range(300)]
    for t in live:
        await sender.send("chat.message", room=room, text=t)
    await back.wait(lambda _: len(back.texts()) >= 1800, 30, "replay + live")
    await sender.wait(lambda _: len(sender.texts()) >= 1801, 30, "sender sees all")
    got = back.texts()
    assert len(got) == len(set(got)) == 1800
    assert got[:1500] == [f"old {i}" for i in range(1500)]
    assert [t for t in got if t.startswith("live")] == live
    stored = await stored_messages(shared_stack.nats.url, room)
    assert_one_order(back, room, int(str(since)), stored)


async def test_ids_out_of_order_do_not_change_the_order_or_the_replay(
    shared_stack: Stack, room: str
) -> None:
    """The ULID counter-example: B stored after A with an id that sorts lower. Ids from the
    bus are not kept (roombus makes them) and cursors are sequences: `since=A` gives B."""
    g = shared_stack.gateway
    c = await Client.open(g.ws_url, "c")
    await c.join(room)
    nc = await nats.connect(shared_stack.nats.url)
    try:
        for text, forged in (
            ("A", "7ZZZZZZZZZZZZZZZZZZZZZZZZZ"),
            ("B", "00000000000000000000000000"),
        ):
            body = {"id": forged, "user": "ops", "text": text, "ts": "1970-01-01T00:00:00Z"}
            await nc.request(f"room.{room}.message", json.dumps(body).encode(), timeout=5)
    finally:
        await nc.close()
    await c.wait_texts(["A", "B"], room)
    a, b = (f["data"] for f in c.of("chat.message"))
    assert (a["text"], b["text"]) == ("A", "B") and a["seq"] < b["seq"] and b["prev"] == a["seq"]
    assert is_id(a["id"]) and a["id"] != "7ZZZZZZZZZZZZZZZZZZZZZZZZZ" and a["id"] < b["id"]
    assert not a["ts"].startswith("1970")
    back = await Client.open(g.ws_url, "back")
    await back.send("join", room=room, since=a["seq"])
    await back.wait_texts(["B"], room)
    assert back.texts() == ["B"]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "join", "data": {"room": "ROOM", "since": "not-a-seq"}}, "bad_cursor"),
        ({"type": "join", "data": {"room": "ROOM", "since": -1}}, "bad_cursor"),
        ({"type": "join", "data": {"room": "ROOM", "since": 2**60}}, "bad_cursor"),
        ({"type": "history", "data": {"room": "ROOM", "limit": 1000}}, "invalid"),
        ({"type": "history", "data": {"room": "ROOM", "before": "x"}}, "bad_cursor"),
        ({"type": "history", "data": {"room": "OTHER"}}, "not_joined"),
        ({"type": "history", "data": {"room": "a.b"}}, "bad_name"),
        ({"type": "dm.history", "data": {"after": 1.5}}, "bad_cursor"),
    ],
)
async def test_bad_history_input_gets_a_clear_error(
    shared_stack: Stack, room: str, frame: dict[str, object], code: str
) -> None:
    g = shared_stack.gateway
    c = await Client.open(g.ws_url, "x")
    await c.join(room)
    raw = json.dumps(frame).replace("OTHER", room + "z").replace("ROOM", room)
    await c.send_raw(raw)
    await c.error(code)
    await c.send("chat.message", room=room, text="still fine")
    await c.wait_texts(["still fine"])


async def test_since_beyond_the_stream_or_from_another_epoch_is_not_recovered(
    shared_stack: Stack, room: str
) -> None:
    g = shared_stack.gateway
    c = await Client.open(g.ws_url, "c")
    joined = await c.join(room)
    await send_and_ack(c, room, ["x"])
    position = c.of("ack")[-1]["data"]["seq"]
    for extra, reason in (
        ({"since": position + 10_000_000}, "bad_cursor"),
        ({"since": 1, "epoch": "123"}, "epoch"),
    ):
        other = await Client.open(g.ws_url, "other")
        await other.send("join", room=room, **extra)
        answer = (await other.next("joined", room=room))["data"]
        assert answer["recovered"] is False and answer["reason"] == reason
        assert answer["seq"] >= position and answer["epoch"] == joined["data"]["epoch"]
        await c.send("chat.message", room=room, text=f"after {reason}")
        await other.wait_texts([f"after {reason}"], room)
        assert other.texts(room) == [f"after {reason}"]  # nothing replayed, live goes on


async def test_since_older_than_retention_is_not_recovered_and_says_expired(
    fresh_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    services("history", fresh_nats, HISTORY_MAX_MSGS_PER_ROOM=5)
    g = services("gateway", fresh_nats)
    c = await Client.open(g.ws_url, "c")
    await c.join(room)
    gone = next(iter((await send_and_ack(c, room, ["gone"])).values()))["seq"]
    await send_and_ack(c, room, [f"k{i}" for i in range(8)])
    back = await Client.open(g.ws_url, "back")
    await back.send("join", room=room, since=gone)
    answer = (await back.next("joined", room=room))["data"]
    assert answer["recovered"] is False and answer["reason"] == "expired"
    # Never a silent partial replay: the client reloads with `history` instead.
    await back.send("history", room=room, limit=100)
    page = (await back.next("history", room=room))["data"]
    assert [m["text"] for m in page["messages"]] == [f"k{i}" for i in range(3, 8)]
    assert back.texts() == []


async def test_more_missed_than_replay_max_is_not_recovered_with_the_count(
    shared_stack: Stack, services: ServiceFactory, room: str
) -> None:
    g = services("gateway", shared_stack.nats, history=False, REPLAY_MAX=10)
    c = await Client.open(g.ws_url, "c")
    joined = await c.join(room)
    await send_and_ack(c, room, [f"m{i}" for i in range(25)])
    back = await Client.open(g.ws_url, "back")
    await back.send("join", room=room, since=joined["data"]["seq"])
    answer = (await back.next("joined", room=room))["data"]
    assert (answer["recovered"], answer["reason"], answer["missed"]) == (False, "too_many", 25)


@pytest.mark.slow  # deletes and recreates the stream under a running gateway
async def test_a_recreated_stream_is_a_new_epoch(
    fresh_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    h = services("history", fresh_nats)
    g = services("gateway", fresh_nats)
    c = await Client.open(g.ws_url, "c")
    old = (await c.join(room))["data"]
    await send_and_ack(c, room, ["before"])
    since = c.of("ack")[-1]["data"]["seq"]
    h.kill()
    nc = await nats.connect(fresh_nats.url)
    try:
        await nc.jetstream().delete_stream("HISTORY")
    finally:
        await nc.close()
    services("history", fresh_nats)
    # Members already in the room are told (joined again, not recovered, new epoch).
    notice = await c.next("joined", timeout=20, room=room, reason="epoch")
    assert notice["data"]["epoch"] != old["epoch"] and notice["data"]["recovered"] is False
    back = await Client.open(g.ws_url, "back")
    await back.send("join", room=room, since=since, epoch=old["epoch"])
    answer = (await back.next("joined", room=room))["data"]
    assert answer["recovered"] is False and answer["reason"] == "epoch"
    await send_and_ack(c, room, ["after"])
    await back.wait_texts(["after"], room)
    assert back.texts(room) == ["after"]


@pytest.mark.slow
async def test_kill_9_of_one_history_replica_loses_nothing(
    fresh_nats: NatsServer, services: ServiceFactory, room: str
) -> None:
    h1 = services("history", fresh_nats)
    services("history", fresh_nats)
    g1, g2 = services("gateway", fresh_nats), services("gateway", fresh_nats)
    senders = [await Client.open(g.ws_url, f"s{i}") for i, g in enumerate((g1, g2, g1, g2))]
    starts = {s.user: (await s.join(room))["data"]["seq"] for s in senders}
    per_sender = 1500

    async def run(s: Client) -> None:
        for i in range(per_sender):
            await s.send("chat.message", room=room, text=f"{s.user} {i}", client_id=f"{s.user}-{i}")
            if i % 200 == 199:  # let acks catch up a little so the run spans the kill
                await s.wait(lambda _, n=i - 150: len(s.of("ack")) >= n, 60, "acks")

    async def killer() -> None:
        await senders[0].wait(lambda _: len(senders[0].of("ack")) >= 400, 60, "400 acks")
        h1.kill()

    await asyncio.gather(*(run(s) for s in senders), killer())
    for s in senders:
        await s.wait(lambda _, s=s: len(s.of("ack")) >= per_sender, 90, "all acks")
    total = per_sender * len(senders)
    for s in senders:
        await s.wait(lambda _, s=s: len(s.texts()) >= total, 60, "all delivered")
    stored = await stored_messages(fresh_nats.url, room)
    assert len(stored) == total
    assert len({m["id"] for m in stored}) == total
    for s in senders:
        acks = Counter(a["data"]["client_id"] for a in s.of("ack"))
        assert len(acks) == per_sender and set(acks.values()) == {1}
        assert s.of("error") == []
        assert_one_order(s, room, starts[s.user], stored)
    acked_ids = {a["data"]["id"] for s in senders for a in s.of("ack")}
    assert acked_ids == {m["id"] for m in stored}
    retries = sum(g.metric("roombus_gateway_published_total", 'kind="retry"') for g in (g1, g2))
    print(f"kill -9 of a history replica: {total} sent, {len(stored)} stored, {retries} retries")


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
    wait_for(lambda: not h.alive(), 5, "history gone")
