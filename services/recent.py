"""A bounded set of recently seen keys (ids, idempotency keys): the oldest are forgotten."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class RecentIds(Generic[K]):
    """The last ``limit`` distinct keys added, in insertion order; memory stays bounded.

    ``add`` says whether a key is new: the check-and-remember of a dedupe in one call.
    A key seen again is not refreshed (its age is that of its first sighting).
    """

    __slots__ = ("limit", "_keys")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._keys: OrderedDict[K, None] = OrderedDict()

    def add(self, key: K) -> bool:
        """Remember ``key``; False when it was already there (a duplicate)."""
        keys = self._keys
        if key in keys:
            return False
        keys[key] = None
        if len(keys) > self.limit:
            keys.popitem(last=False)
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)
