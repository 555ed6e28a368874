"""Exponential backoff with full jitter (each wait uniform in [0, min(cap, base * 2**n)])."""

from __future__ import annotations

import random


class Backoff:
    """Delays for reconnect attempts; :meth:`reset` once a connection proved stable."""

    def __init__(self, base: float = 0.25, cap: float = 10.0, rng: random.Random | None = None):
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2**self.attempt)
        self.attempt = min(self.attempt + 1, 30)
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0
