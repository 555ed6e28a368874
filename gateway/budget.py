"""A per-user budget for the queries that cost the history service work (``history``,
``dm.history``, ``join`` with ``since``): one user — with any number of connections to this
gateway — cannot keep the history replicas busy for everyone else."""

from __future__ import annotations

import time


class QueryBudget:
    """A token bucket per user (``rate`` queries/s, ``burst`` saved up). Users whose bucket
    is full again are forgotten, so memory follows the users querying now."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, user: str) -> bool:
        """True when ``user`` may query now (and charges one query)."""
        now = time.monotonic()
        tokens, stamp = self._buckets.get(user, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        if tokens < 1:
            self._buckets[user] = (tokens, now)
            return False
        self._buckets[user] = (tokens - 1, now)
        if len(self._buckets) > 10_000:
            self._prune(now)
        return True

    def _prune(self, now: float) -> None:
        full = self.burst / self.rate
        for user, (_, stamp) in list(self._buckets.items()):
            if now - stamp > full:
                del self._buckets[user]
