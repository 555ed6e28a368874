"""The gateway's protocol in-process (tests.support.memgateway): real core, sessions, publisher
and limits over the in-memory bus and stream. Acks, retries, refusals, limits and the one
order, each in milliseconds; the same promises end to end are in tests/integration."""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway import handlers, publisher
from gateway.auth import Identity
from proto import subjects
from proto.errors import ErrorCode
from tests.support.memgateway import Client, soon, stack


async def test_every_member_on_every_gateway_sees_the_stream_order_once() -> None:
    """Three senders on two gateways, 600 messages, interleaved: each member of the room
    receives every message once, in the stream's order, ``prev`` linked, and every sender
    got one ack per send naming the stored ``seq``."""
    async with stack() as s:
        gws = [await s.gateway(), await s.gateway()]
        members = [Client(gws[i % 2], f"m{i}") for i in range(4)]
        senders = [Client(gws[i % 2], f"s{i}") for i in range(3)]
        for c in members + senders:
            await c.join("lobby")
        rng = random.Random(7)
        sends = [(c, f"{c.conn.user}-{n}") for c in senders for n in range(200)]
        rng.shuffle(sends)
        await asyncio.gather(
            *(c.send("chat.message", room="lobby", text=t, client_id=t) for c, t in sends)
        )
        await soon(lambda: all(len(c.texts("lobby")) >= 600 for c in members), "600 each")
        stored = s.stream.seqs(subjects.history("lobby"))
        assert len(stored) == 600
        for c in members + senders:
            chats = c.of("chat.message")
            assert [m["seq"] for m in chats] == stored
            assert [m["prev"] for m in chats[1:]] == stored[:-1]
        for c in senders:
            await soon(lambda c=c: len(c.of("ack")) == 200, "200 acks")  # type: ignore[misc]
            acks = {a["client_id"]: a["seq"] for a in c.of("ack")}
            mine = {
                m["client_id"]: m["seq"] for m in c.of("chat.message") if m["user"] == c.conn.user
            }
            assert acks == mine


async def test_an_ack_lost_on_the_way_is_retried_with_the_same_key_and_stored_once() -> None:
    async with stack() as s:
        gw = await s.gateway(ack_timeout=0.05)
        alice = Client(gw, "alice")
        await alice.join("lobby")
        s.history.lose_replies = 2
        await alice.send("chat.message", room="lobby", text="hi", client_id="c1")
        ack = await alice.next("ack")
        ((key, original),) = s.history.stored.items()
        assert (ack["id"], ack["seq"]) == (original.id, original.seq)
        assert s.stream.seqs(subjects.history("lobby")) == [original.seq]
        assert s.history.requests == 3  # two unanswered, the third acked as the duplicate
        assert alice.texts("lobby") == ["hi"]


async def test_a_resend_through_another_gateway_is_acked_with_the_original() -> None:
    async with stack() as s:
        a, b = await s.gateway(), await s.gateway()
        first, second = Client(a, "alice"), Client(b, "alice")
        for c in (first, second):
            await c.join("lobby")
        await first.send("chat.message", room="lobby", text="once", client_id="same")
        await second.send("chat.message", room="lobby", text="once", client_id="same")
        one, two = await first.next("ack"), await second.next("ack")
        assert (one["id"], one["seq"]) == (two["id"], two["seq"])
        assert len(s.stream.seqs(subjects.history("lobby"))) == 1


async def test_no_history_replica_is_unavailable_naming_the_send_and_a_resend_is_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(publisher, "NO_RESPONDERS_GRACE", 0.05)
    async with stack(history=False) as s:
        gw = await s.gateway()
        alice = Client(gw, "alice")
        await alice.join("lobby")
        await alice.send("chat.message", room="lobby", text="hi", client_id="c1")
        err = await alice.next("error")
        assert (err["code"], err["client_id"]) == ("unavailable", "c1")
        assert gw.ready()[1]["storage"] is False
        await s.history.start()
        await alice.send("chat.message", room="lobby", text="hi", client_id="c1")
        assert (await alice.next("ack"))["client_id"] == "c1"
        assert gw.ready()[1]["storage"] is True
        assert alice.texts("lobby") == ["hi"]


async def test_a_refusing_store_is_told_at_once_with_its_reason() -> None:
    async with stack() as s:
        gw = await s.gateway()
        alice = Client(gw, "alice")
        await alice.join("lobby")
        s.history.refusing = (ErrorCode.NOT_STORED, "maximum bytes exceeded")
        await alice.send("chat.message", room="lobby", text="hi", client_id="c1")
        err = await alice.next("error")
        assert err == {"code": "not_stored", "message": "maximum bytes exceeded", "client_id": "c1"}
        assert s.history.requests == 1  # a refusal is not retried
        assert s.stream.seqs(subjects.history("lobby")) == []


async def test_frozen_storage_fills_the_inflight_slots_then_sends_are_refused_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MAX_INFLIGHT unacked sends; the next waits for a slot, then storage is taken as down
    and every later send is refused at once, named — until an ack comes back."""
    monkeypatch.setattr(handlers, "INFLIGHT_WAIT", 0.05)
    async with stack() as s:
        gw = await s.gateway(max_inflight=2, ack_timeout=0.02)
        alice = Client(gw, "alice")
        await alice.join("lobby")
        s.history.open.clear()
        for n in range(4):
            await alice.send("chat.message", room="lobby", text=f"t{n}", client_id=f"c{n}")
        refused = [e["client_id"] for e in await alice.count("error", 2)]
        assert refused == ["c2", "c3"]
        assert {e["code"] for e in alice.of("error")} == {"unavailable"}
        assert gw.ready()[1]["storage"] is False
        s.history.open.set()
        await soon(lambda: len(alice.of("ack")) == 2, "the two waiting sends acked")
        assert gw.ready()[1]["storage"] is True
        await alice.send("chat.message", room="lobby", text="t2", client_id="c2")
        await soon(lambda: len(alice.of("ack")) == 3, "the resend acked")
        assert sorted(alice.texts("lobby")) == ["t0", "t1", "t2"]


async def test_limits_are_answered_with_their_codes_and_lose_nothing() -> None:
    async with stack() as s:
        gw = await s.gateway(max_rooms=1, text_max=10, history_rate=1, history_burst=1)
        narrow = Identity(user="bob", verified=True, rooms=("team-*",))
        alice, bob = Client(gw, "alice"), Client(gw, "bob", narrow)
        await alice.join("lobby")
        await alice.send("join", room="other")
        await alice.send("chat.message", room="lobby", text="x" * 11, client_id="long")
        await alice.send("chat.message", room="nowhere", text="hi")
        await alice.send("history", room="lobby")
        await alice.send("history", room="lobby")
        await alice.send("leave", room="nowhere")
        await alice.send("nonsense")
        await bob.send("join", room="lobby")
        codes = [e["code"] for e in await alice.count("error", 7)]
        assert codes == [
            "too_many_rooms",
            "text_too_long",
            "not_joined",
            "unavailable",  # the first query was let through (nothing here answers queries)
            "rate_limited",  # the second is over the budget: refused without asking
            "not_joined",
            "unknown_type",
        ]
        assert [e["code"] for e in await bob.count("error", 1)] == ["forbidden"]
        assert alice.of("error")[1]["client_id"] == "long"
        await alice.send("chat.message", room="lobby", text="still ok", client_id="ok")
        await alice.next("ack")
        assert alice.texts("lobby") == ["still ok"]


async def test_typing_reaches_everyone_the_sender_too_and_repeats_are_coalesced() -> None:
    async with stack() as s:
        a, b = await s.gateway(typing_interval=60), await s.gateway()
        alice, bob = Client(a, "alice"), Client(b, "bob")
        for c in (alice, bob):
            await c.join("lobby")
        for _ in range(3):
            await alice.send("typing", room="lobby")
        for c in (alice, bob):
            await c.next("typing")
        await alice.send("chat.message", room="lobby", text="after", client_id="x")
        await bob.next("chat.message")  # anything typed before it has arrived by now
        for c in (alice, bob):
            assert c.of("typing") == [{"room": "lobby", "user": "alice"}]


async def test_a_rejoin_with_since_replays_exactly_what_was_missed_then_live() -> None:
    async with stack() as s:
        gw = await s.gateway()
        alice, bob = Client(gw, "alice"), Client(gw, "bob")
        await alice.join("lobby")
        joined = await bob.join("lobby")
        await alice.send("chat.message", room="lobby", text="seen", client_id="0")
        await bob.next("chat.message")
        await bob.send("leave", room="lobby")
        for n in range(1, 6):
            await alice.send("chat.message", room="lobby", text=f"missed{n}", client_id=str(n))
        await soon(lambda: len(alice.of("ack")) == 6, "six acks")
        seen = bob.of("chat.message")[-1]["seq"]
        again = await bob.join("lobby", since=seen, epoch=joined["epoch"])
        assert again["recovered"] is True
        await alice.send("chat.message", room="lobby", text="live", client_id="6")
        await soon(lambda: "live" in bob.texts("lobby"), "the live message")
        assert bob.texts("lobby") == ["seen", *(f"missed{n}" for n in range(1, 6)), "live"]


async def test_a_dm_reaches_the_other_gateway_and_both_parties_inboxes() -> None:
    async with stack() as s:
        a, b = await s.gateway(), await s.gateway()
        alice, bob = Client(a, "alice"), Client(b, "bob")
        await alice.send("dm", to="bob", text="psst", client_id="d1")
        ack = await alice.next("ack")
        got = await bob.next("dm")
        assert (got["from"], got["text"], got["id"]) == ("alice", "psst", ack["id"])
        assert (await alice.next("dm"))["id"] == ack["id"]  # the sender's other tabs see it


async def test_an_ephemeral_room_is_acked_at_once_and_never_stored() -> None:
    async with stack() as s:
        a, b = await s.gateway(ephemeral_rooms="live-*"), await s.gateway(ephemeral_rooms="live-*")
        alice, bob = Client(a, "alice"), Client(b, "bob")
        for c in (alice, bob):
            assert (await c.join("live-1"))["ephemeral"] is True
        await alice.send("chat.message", room="live-1", text="now", client_id="e1")
        ack = await alice.next("ack")
        assert "seq" not in ack
        assert (await bob.next("chat.message"))["id"] == ack["id"]
        assert s.history.requests == 0
        assert s.stream.seqs(subjects.history("live-1")) == []
