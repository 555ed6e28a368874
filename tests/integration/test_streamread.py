"""The JetStream reader against a real nats-server, with the in-memory stream as the oracle:
both answer every read of the ``Reader`` protocol the same for the same messages."""

from __future__ import annotations

import secrets

import nats
import pytest
from nats.js.api import StreamConfig

from services.memstream import MemoryStream
from services.streamread import Stored, StreamReader
from tests.support.procs import NatsServer


def _row(s: Stored | None) -> tuple[int, str, bytes, int] | None:
    return None if s is None else (s.seq, s.subject, s.data, s.pending)


async def test_the_jetstream_reader_answers_as_the_in_memory_stream(
    nats_server: NatsServer,
) -> None:
    name = f"T{secrets.token_hex(4)}"
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], allow_direct=True))
    memory = MemoryStream()
    try:
        # Two subjects interleaved, payloads of several sizes; the per-subject sequences skip.
        for i in range(120):
            subject = f"{name}.{'a' if i % 3 else 'b'}"
            data = b"x" * (i * 37 % 900)
            ack = await js.publish(subject, data)
            assert memory.publish(subject, data).seq == ack.seq
        reader = StreamReader(nc, name)
        await reader.start()
        a, b = f"{name}.a", f"{name}.b"
        for subject in (a, b, f"{name}.none"):
            assert await reader.last(subject) == await memory.last(subject)
            for seq in (0, 1, 2, 50, 119, 120, 121):
                got, want = (
                    await reader.first_from(subject, seq),
                    await memory.first_from(subject, seq),
                )
                assert _row(got) == _row(want), (subject, seq)
                assert await reader.count_from(subject, seq) == await memory.count_from(
                    subject, seq
                )
            for after, limit in ((0, 10), (40, 500), (119, 5)):
                rows, more = await reader.after(subject, after, limit)
                want_rows, want_more = await memory.after(subject, after, limit)
                assert [_row(r) for r in rows] == [_row(r) for r in want_rows]
                assert more == want_more, (subject, after, limit)
            for before, limit in ((None, 10), (100, 7), (5, 10), (121, 200)):
                page, prev, more = await reader.before(subject, before, limit)
                want_page, want_prev, want_more = await memory.before(subject, before, limit)
                assert [(r.seq, r.data) for r in page] == [(r.seq, r.data) for r in want_page]
                assert (prev, more) == (want_prev, want_more), (subject, before, limit)
            # A byte bound cuts a page early (where exactly is the server's to say): never
            # empty, a prefix of the page, and `more` says that the rest is there.
            rows, more = await reader.after(subject, 0, 50, 2000)
            whole, _ = await memory.after(subject, 0, 50)
            if not whole:
                assert rows == [] and not more
                continue
            assert 0 < len(rows) < len(whole) and more
            assert [_row(r) for r in rows] == [_row(r) for r in whole[: len(rows)]]
        # The leader's get: the message at a sequence, or None where there is none.
        for seq in (1, 77, 120):
            got, want = await reader.get(seq), await memory.get(seq)
            assert got is not None and want is not None
            assert (got.seq, got.subject, got.data) == (want.seq, want.subject, want.data)
        assert await reader.get(121) is None and await memory.get(121) is None
        await js.delete_msg(name, 77)
        assert await reader.get(77) is None
        await reader.stop()
    finally:
        await js.delete_stream(name)
        await nc.close()


@pytest.mark.parametrize("seq", [1, 3])
async def test_the_leaders_get_returns_the_headers_free_payload(
    nats_server: NatsServer, seq: int
) -> None:
    name = f"T{secrets.token_hex(4)}"
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], allow_direct=True))
    try:
        for i in range(1, 4):
            await js.publish(f"{name}.r", f'{{"n":{i}}}'.encode(), headers={"Nats-Msg-Id": str(i)})
        reader = StreamReader(nc, name)
        got = await reader.get(seq)
        assert got is not None and got.data == f'{{"n":{seq}}}'.encode()
        await reader.stop()
    finally:
        await js.delete_stream(name)
        await nc.close()
