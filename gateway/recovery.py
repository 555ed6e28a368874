"""Joining a stored room with ``since``: exactly the missed messages, in stream order, once,
then live ones — or ``recovered: false`` with the reason, never a silent partial replay."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from proto import subjects
from proto.errors import ErrorCode
from proto.frames import FrameError, error_frame
from services.backoff import Backoff
from services.logs import Malformed, RateLimitedLog
from services.streamread import ReadError

from . import metrics
from .conn import Catch, Conn
from .feeds import BEHIND_MAX, room_frame

if TYPE_CHECKING:
    from .core import Gateway
    from .shards import Shard

log = logging.getLogger("roombus.gateway.recovery")

# A stored message that does not parse is skipped (the stream is writable by anyone on the
# bus): counted and logged like every malformed bus input, at most a line per interval.
_malformed = Malformed(RateLimitedLog(log), lambda kind: metrics.BUS_MALFORMED.labels(kind).inc())

REPLAY_PAGE = 500
ROUNDS_MAX = 100
"""Read rounds before a replay that cannot catch up with a fast room gives up."""


async def _ready(gw: Gateway, conn: Conn, room: str) -> int:
    """Wait until the room's feed knows its position; returns it."""
    feed = gw.hub.room_feed(room)
    if feed is not None and not feed.ready.is_set():
        try:
            async with asyncio.timeout(gw.settings.request_timeout):
                await feed.ready.wait()
        except TimeoutError:
            feed = None
    if feed is None or feed.last is None:
        gw.hub.leave(conn, room)
        raise FrameError(ErrorCode.UNAVAILABLE, "the room's history cannot be read right now")
    return feed.last


async def join_stored(
    gw: Gateway, conn: Conn, room: str, since: int | None, epoch: str | None
) -> dict[str, object]:
    """Join ``room`` and decide about ``since``; returns the ``joined`` fields.

    ``seq`` in the answer is where this client now stands: with ``recovered: true`` it is
    ``since`` and the missed messages follow; otherwise it is the room's current position.
    """
    key = subjects.history(room)
    if room in conn.rooms:  # joined already: where it stands now
        since = None
    elif since is not None:
        conn.catching[key] = Catch(gw.settings.replay_buffer, gw.settings.send_buffer_bytes * 4)
    gw.hub.join(conn, room)
    shard, stored_on = gw.shards.room(room)  # the room's seq and epoch are its shard's
    try:
        position = await _ready(gw, conn, room)
        fields: dict[str, object] = {"epoch": shard.epoch, "seq": position}
        if since is None:
            return fields
        reason, missed = await _check_since(gw, shard, stored_on, since, epoch)
    except ReadError:
        conn.catching.pop(key, None)
        gw.hub.leave(conn, room)
        raise FrameError(ErrorCode.UNAVAILABLE, "the room's history cannot be read now") from None
    except BaseException:
        conn.catching.pop(key, None)
        raise
    if reason is not None:
        # Not recovered: the client starts at the room's position now; what the feed
        # delivered meanwhile is at or before it.
        conn.catching.pop(key, None)
        feed = gw.hub.room_feed(room)
        position = feed.last if feed is not None and feed.last is not None else position
        metrics.NOT_RECOVERED.labels(reason).inc()
        out = {**fields, "seq": position, "recovered": False, "reason": reason}
        return out | ({"missed": missed} if missed is not None else {})
    return {**fields, "seq": since, "recovered": True}


async def _check_since(
    gw: Gateway, shard: Shard, key: str, since: int, epoch: str | None
) -> tuple[str | None, int | None]:
    """(reason it cannot be recovered or None, how many were missed when known); ``key`` is
    the room's subject in ``shard``'s stream."""
    reader = shard.reader
    if epoch is not None and epoch != shard.epoch:
        return "epoch", None
    if since == 0:
        count = await reader.count_from(key, 1)
    else:
        found = await reader.first_from(key, since)
        if found is None:
            # Nothing at or after `since` in this room: up to date, unless `since` is
            # beyond the end of the whole stream (a cursor from elsewhere).
            state = await reader.state()
            return ("bad_cursor", None) if since > state.last_seq else (None, 0)
        if found.seq == since:
            count = found.pending
        else:
            # `since` is not (any more) a message of this room.
            oldest = await reader.first_from(key, 1)
            if oldest is not None and oldest.seq < since:
                return "bad_cursor", None
            return "expired", found.pending + 1
    if count > gw.settings.replay_max:
        return "too_many", count
    return None, count


async def replay(gw: Gateway, conn: Conn, room: str, since: int) -> None:
    """Every stored message after ``since``, in order, then the live ones held meanwhile.

    Held live messages that overflowed, or that do not link to what was read (``prev``),
    are read from the stream again: the client never sees a gap or a message twice.
    """
    key = subjects.history(room)
    shard, stored_on = gw.shards.room(room)
    reader = shard.reader
    cursor = since
    behind = Backoff(0.005, BEHIND_MAX)
    try:
        for _ in range(ROUNDS_MAX):
            catch = conn.catching.get(key)
            if catch is None or conn.is_closed:
                return  # left the room or went away meanwhile
            rows, more = await reader.after(stored_on, cursor, REPLAY_PAGE)
            for row in rows:
                try:
                    frame = room_frame(row.data, row.seq, cursor, room)
                except ValueError as exc:
                    _malformed.drop(
                        "bad_stored",
                        "skipped a malformed stored message in a replay",
                        metric="stored",
                        seq=row.seq,
                        error=str(exc)[:200],
                    )
                    cursor = row.seq
                    continue
                if not await conn.put(frame, row.seq, room):
                    return
                cursor = row.seq
            metrics.REPLAYED.inc(len(rows))
            if more:
                continue
            if catch.overflow:
                catch.overflow = False
                continue
            held = [r for r in catch.rows if r[0] > cursor]
            # The read must reach what the client is owed before live messages: the message
            # the first held one links to, else the last one the feed delivered before this
            # client joined. Short of it, the replica that answered was behind (or the message
            # came after the read): read again, unless the leader says it is gone (expired).
            if held:
                owed = held[0][1]
            else:
                feed = gw.hub.room_feed(room)
                owed = (feed.last or 0) if feed is not None else 0
            if owed > cursor and await reader.get(owed) is not None:
                metrics.READ_BEHIND.inc()
                await asyncio.sleep(behind.next())
                continue
            held = [r for r in catch.rows if r[0] > cursor]
            if held and held[0][1] > cursor and held[0][1] != owed:
                catch.rows = held
                continue  # a held message links to one stored meanwhile: read again
            # Caught up: hand over to the live feed (no await from here on).
            del conn.catching[key]
            for seq, _prev, frame in held:
                conn.offer(frame, seq, room=room)
                cursor = seq
            feed = gw.hub.room_feed(room)
            if feed is not None and feed.last is not None and cursor > feed.last:
                conn.floor[key] = cursor  # we read ahead of the feed: skip what it repeats
            return
        _give_up(gw, conn, room, "replay could not catch up with the room; rejoin with since")
    except ReadError:
        _give_up(gw, conn, room, "replay was cut short; rejoin with since")
    except BaseException:
        conn.catching.pop(key, None)
        raise


def _give_up(gw: Gateway, conn: Conn, room: str, message: str) -> None:
    """A replay that cannot finish leaves the room (no silent gap) and says so."""
    conn.catching.pop(subjects.history(room), None)
    gw.hub.leave(conn, room)
    conn.offer(error_frame(ErrorCode.UNAVAILABLE, message, room=room, left=True))
