"""A bounded inbox that one reader iterates: direct messages, subscribed events."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    """Items in arrival order; when ``size`` are unread the oldest go first (and are counted
    in :attr:`dropped`). Iterating raises what stopped the client."""

    def __init__(self, size: int, check: Callable[[], None]) -> None:
        self._items: deque[T] = deque()
        self._size = size
        self._check = check
        self._wake = asyncio.Event()
        self.closed = False
        self.dropped = 0

    def put(self, item: T) -> None:
        if len(self._items) >= self._size:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def __aiter__(self) -> Mailbox[T]:
        return self

    async def __anext__(self) -> T:
        # A method, not a generator: cancelling one wait (asyncio.wait_for) loses nothing.
        while not self._items:
            if self.closed:
                raise StopAsyncIteration
            self._check()
            self._wake.clear()
            await self._wake.wait()
        return self._items.popleft()
