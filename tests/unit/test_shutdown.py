"""The one shutdown deadline: counted once, shared by every phase, hooks run first and once."""

from __future__ import annotations

import pytest

from services.lifecycle import Shutdown


def test_the_deadline_starts_once_and_every_phase_gets_what_is_left() -> None:
    stopping = Shutdown(10.0)
    assert not stopping.started
    stopping.begin()
    first = stopping.left()
    stopping.begin()  # a second signal does not move the deadline
    assert 9.0 < stopping.left() <= first <= 10.0


def test_left_starts_the_clock_when_no_signal_did() -> None:
    stopping = Shutdown(5.0)
    assert 4.0 < stopping.left() <= 5.0 and stopping.started


def test_hooks_run_once_and_a_failing_hook_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stopping = Shutdown(1.0)
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    stopping.on_begin(broken)
    stopping.on_begin(lambda: ran.append("sse"))
    stopping.run_hooks()
    stopping.run_hooks()
    assert ran == ["sse"] and stopping.started
    assert "shutdown hook failed" in caplog.text
