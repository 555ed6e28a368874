"""The one retry rule of every roombus loop that waits before trying again."""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff with a cap and (by default) full jitter.

    The n-th wait (n = 0, 1, ...) has the ceiling ``min(first * 2**n, cap)``; with jitter the
    wait is uniform in ``[0, ceiling]`` ("full jitter"), so processes that lost the same broker
    at the same moment do not come back in lockstep. ``jitter=False`` gives the ceilings
    themselves: for a ladder of timeouts rather than sleeps. ``reset()`` after a success.
    """

    __slots__ = ("first", "cap", "jitter", "_n")

    def __init__(self, first: float, cap: float, *, jitter: bool = True) -> None:
        if first <= 0 or cap <= 0:
            raise ValueError("backoff delays must be positive")
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self._n = 0

    @property
    def ceiling(self) -> float:
        """The longest the next wait can be."""
        # (the exponent is bounded: past the cap it no longer grows)
        return min(self.first * 2.0 ** min(self._n, 64), self.cap)

    def next(self) -> float:
        """Seconds to wait before the next attempt."""
        ceiling = self.ceiling
        self._n += 1
        return random.uniform(0.0, ceiling) if self.jitter else ceiling

    def reset(self) -> None:
        self._n = 0
