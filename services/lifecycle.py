"""Process lifecycle helpers shared by the services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("roombus.lifecycle")


class TaskGroup:
    """Background tasks of a service, cancelled together under a deadline at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "background task failed",
                exc_info=task.exception(),
                extra={"task": task.get_name()},
            )

    async def cancel_all(self, within: float = 5.0) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait(tasks, timeout=within)


class Shutdown:
    """One hard deadline for a graceful shutdown, shared by all its phases.

    The clock starts at the first SIGTERM/SIGINT (:meth:`begin`); every phase — closing
    client connections, waiting for work in flight, draining NATS — waits only for a part
    of what is :meth:`left`, so the whole shutdown fits in ``timeout`` seconds. The hooks
    registered with :meth:`on_begin` run first (the gateway ends its SSE streams there:
    an open stream would otherwise hold the connection phase for its whole share).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._at: float | None = None
        self._hooks: list[Callable[[], None]] = []
        self._hooks_ran = False

    @property
    def started(self) -> bool:
        return self._at is not None

    def begin(self) -> None:
        """Start the clock (idempotent; safe to call from a signal handler)."""
        if self._at is None:
            self._at = time.monotonic() + self.timeout

    def left(self) -> float:
        """Seconds until the deadline (starting the clock if nothing did)."""
        self.begin()
        assert self._at is not None
        return max(0.0, self._at - time.monotonic())

    def on_begin(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` (in the event loop) when shutdown starts, before anything else."""
        self._hooks.append(hook)

    def run_hooks(self) -> None:
        """Start the clock and run the hooks, once."""
        self.begin()
        if self._hooks_ran:
            return
        self._hooks_ran = True
        for hook in self._hooks:
            try:
                hook()
            except Exception:
                log.exception("shutdown hook failed")
