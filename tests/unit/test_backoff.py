"""The one retry rule: exponential with a cap, full jitter unless asked for the ladder itself."""

from __future__ import annotations

import pytest

from services.backoff import Backoff


def test_ceilings_double_up_to_the_cap_and_reset_starts_over() -> None:
    ladder = Backoff(0.1, 0.5, jitter=False)
    assert [ladder.next() for _ in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    ladder.reset()
    assert ladder.next() == pytest.approx(0.1)


def test_jittered_waits_stay_between_zero_and_the_ceiling() -> None:
    backoff = Backoff(0.05, 2.0)
    for _ in range(200):
        ceiling = backoff.ceiling
        assert 0.0 <= backoff.next() <= ceiling
    assert backoff.ceiling == 2.0


def test_a_first_wait_above_the_cap_is_capped() -> None:
    assert Backoff(30.0, 2.0, jitter=False).next() == 2.0


def test_delays_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
