"""Waiting for conditions with a deadline: one helper for sync code, one for async tests.

``wait_for`` blocks (``time.sleep`` between polls): for fixtures and sync tests only. Inside an
``async def`` test it would freeze the event loop the test's clients run on, so those use
``await until(...)``, which polls without blocking the loop.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["until", "wait_for"]

POLL = 0.05
"""Seconds between two polls."""

T = TypeVar("T")


def _timed_out(what: str, timeout: float, last_exc: BaseException | None) -> AssertionError:
    return AssertionError(
        f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})"
    )


def wait_for(
    cond: Callable[[], T | None], timeout: float = 15.0, what: str = "condition", poll: float = POLL
) -> T:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` after ``timeout``.

    Blocks the calling thread: never call it from an async test (use :func:`until`).
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # the thing may not be up yet
            last_exc = exc
        time.sleep(poll)
    raise _timed_out(what, timeout, last_exc)


async def until(
    cond: Callable[[], object | Awaitable[object]],
    timeout: float = 15.0,
    what: str = "condition",
) -> object:
    """Await until ``cond`` returns something truthy; fail with ``what`` after ``timeout``.

    ``cond`` may be a coroutine function. A plain function runs in a worker thread: probes
    such as ``ServiceProc.metric`` or ``ready`` do blocking HTTP, and the loop they would
    block is the one the test's WebSocket clients read on. An exception from ``cond`` counts
    as "not yet" (the thing may not be up); the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    is_async = inspect.iscoroutinefunction(cond)
    while True:
        try:
            value = cond() if is_async else await asyncio.to_thread(cond)
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last_exc)
        await asyncio.sleep(POLL)
