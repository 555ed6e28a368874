"""The shared helpers for bad bus input and dedupe: counted, logged once per interval, bounded."""

from __future__ import annotations

import logging

import pytest

from services.logs import Malformed, RateLimitedLog
from services.recent import RecentIds


def test_malformed_input_is_counted_every_time_and_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counted: list[str] = []
    malformed = Malformed(RateLimitedLog(logging.getLogger("t.malformed"), 60.0), counted.append)
    with caplog.at_level(logging.WARNING, "t.malformed"):
        assert malformed.parse("bad_payload", "room.a.message", lambda: int("x")) is None
        assert malformed.parse("bad_payload", "room.a.message", lambda: int("y")) is None
        assert malformed.parse("bad_payload", "room.a.message", lambda: int("7")) == 7
        malformed.drop("bad_event", "dropped event", metric="event")
    assert counted == ["bad_payload", "bad_payload", "event"]
    assert [r.getMessage() for r in caplog.records] == [
        "dropped malformed bus message",
        "dropped event",
    ]
    assert caplog.records[0].subject == "room.a.message"  # type: ignore[attr-defined]


def test_recent_ids_says_what_is_new_and_forgets_the_oldest() -> None:
    recent: RecentIds[str] = RecentIds(2)
    assert recent.add("a") and recent.add("b")
    assert not recent.add("a")  # a duplicate: not refreshed either
    assert recent.add("c")  # "a" is forgotten
    assert "a" not in recent and "b" in recent and "c" in recent and len(recent) == 2
    assert recent.add("a")
