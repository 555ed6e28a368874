"""The history streams a gateway reads (``HISTORY_SHARDS``): one reader and one epoch per
shard, where each room is read from, and whether the streams are the layout configured."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from proto.shards import SHARDS_METADATA, HistoryLayout
from services.shards import PresentStream, layout_problem
from services.streamread import Reader, ReadError

log = logging.getLogger("roombus.gateway.shards")

EPOCH_CHECK = 5.0
"""Seconds between two checks that each history stream is still the same one."""

Reset = Callable[[str, Reader], None]
"""Called with (new epoch, the shard's reader) when a shard's stream was recreated."""
Lister = Callable[[], Awaitable[list[PresentStream]]]
"""The history streams present on the server (``services.shards.present_streams``)."""


@dataclass(eq=False)
class Shard:
    """One history stream and what this gateway knows of it."""

    index: int
    stream: str
    reader: Reader
    epoch: str = ""
    """The stream's epoch (``joined`` reports it for the shard's rooms; a recreated stream
    has a new one); empty until it is read."""


class Shards:
    """Every history stream of the configured layout, by shard."""

    def __init__(
        self, layout: HistoryLayout, readers: Sequence[Reader], lister: Lister | None = None
    ) -> None:
        if len(readers) != layout.shards:
            raise ValueError(f"{len(readers)} readers for {layout.shards} shards")
        self.layout = layout
        self.all = [Shard(p, layout.stream(p), r) for p, r in enumerate(readers)]
        self.problem: str | None = None
        """Why the streams present are not the configured layout, or None."""
        self._lister = lister
        self._listed = float("-inf")

    @property
    def known(self) -> bool:
        """Every shard's stream has been read (its epoch is known)."""
        return all(s.epoch for s in self.all)

    def room(self, room: str) -> tuple[Shard, str]:
        """(``room``'s shard, the subject it is stored on in that shard's stream)."""
        shard, subject = self.layout.place(room)
        return self.all[shard], subject

    def route(self, key: str) -> tuple[Reader, str]:
        """(reader, stored subject) of a feed key (``history.<room>`` / ``inbox.<user>``)."""
        shard, subject = self.layout.locate(key)
        return self.all[shard].reader, subject

    async def watch(self, reset: Reset) -> None:
        while True:
            # Quickly while a stream is not there yet (the history service creates them).
            await asyncio.sleep(EPOCH_CHECK if self.known else 0.25)
            await self.check(reset)

    async def check(self, reset: Reset) -> None:
        """Read each shard's epoch (a recreated stream restarts its rooms, and only those)
        and whether the streams are the layout configured."""
        doubt = False
        for shard in self.all:
            try:
                state = await shard.reader.state()
            except ReadError:
                doubt = True  # not created yet, or another layout's streams are there
                continue
            made = state.metadata.get(SHARDS_METADATA)
            if made is not None and made != str(self.layout.shards):
                doubt = True
            if state.epoch != shard.epoch:
                if shard.epoch:
                    log.warning(
                        "history stream was recreated: its rooms restart",
                        extra={"stream": shard.stream, "epoch": state.epoch},
                    )
                    reset(state.epoch, shard.reader)
                shard.epoch = state.epoch
        if not doubt:
            self._note(None)
        elif self._lister is not None and time.monotonic() - self._listed >= EPOCH_CHECK:
            self._listed = time.monotonic()
            try:
                present = await self._lister()
            except Exception as exc:  # JetStream away: the next check tries again
                log.debug("history streams not listed", extra={"error": repr(exc)[:200]})
                return
            self._note(layout_problem(self.layout, present))

    def _note(self, problem: str | None) -> None:
        if problem != self.problem:
            if problem is not None:
                log.error(
                    "history streams are not the configured layout: not ready",
                    extra={"problem": problem, "history_shards": self.layout.shards},
                )
            else:
                log.info("history streams match HISTORY_SHARDS", extra={"shards": len(self.all)})
        self.problem = problem
