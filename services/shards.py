"""Which history streams exist, and whether they are the layout ``HISTORY_SHARDS`` says.

A room's messages live in the stream of its shard (``proto.shards``): a service started with
another shard count than the streams were made with would look for rooms in the wrong
streams. History refuses to start then (:func:`layout_problem`); a gateway says so in
``/readyz`` and its log.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from proto import subjects
from proto.shards import SHARDS_METADATA, HistoryLayout, stream_shard

from .jetstream import retrying


@dataclass(frozen=True, slots=True)
class PresentStream:
    """A history stream found on the server."""

    name: str
    messages: int
    shards: int | None
    """The ``HISTORY_SHARDS`` it was made for (its metadata), None when it does not say."""

    @property
    def layout_shards(self) -> int | None:
        """The shard count this stream belongs to: 1 for ``HISTORY``; else its metadata's."""
        return 1 if self.name == subjects.HISTORY_STREAM else self.shards


class LayoutError(RuntimeError):
    """The history streams present were made for another ``HISTORY_SHARDS``; says what to do."""


async def ensure_layout(js: JetStreamContext, layout: HistoryLayout, wait: float) -> None:
    """Raise :class:`LayoutError` when the history streams present are not ``layout``'s
    (waiting up to ``wait`` seconds for JetStream to answer at all)."""
    present = await retrying(subjects.HISTORY_STREAM, wait, lambda: present_streams(js))
    problem = layout_problem(layout, present)
    if problem is not None:
        raise LayoutError(problem)


async def present_streams(js: JetStreamContext) -> list[PresentStream]:
    """The history streams (``HISTORY``, ``HISTORY_<p>``) on the server, by name.

    One stream-names request filtered on the subjects they store, then one info per stream.
    """
    req = orjson.dumps({"subject": subjects.HISTORY_WILDCARD})
    # nats-py has no call for the stream names with a subject filter (only the first one).
    resp = await js._api_request(f"{js._prefix}.STREAM.NAMES", req, timeout=js._timeout)
    names = sorted(n for n in resp.get("streams") or [] if stream_shard(n)[0])
    out: list[PresentStream] = []
    for name in names:
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            continue  # removed meanwhile
        raw = (info.config.metadata or {}).get(SHARDS_METADATA, "")
        out.append(
            PresentStream(name, int(info.state.messages), int(raw) if raw.isdigit() else None)
        )
    return out


def layout_problem(layout: HistoryLayout, present: list[PresentStream]) -> str | None:
    """What is wrong when ``present`` streams are not ``layout``'s, or None.

    Streams of this layout (created by a roombus that says so in their metadata, or
    ``HISTORY`` made before sharding) are fine; a missing shard stream is created by the
    history service. Any other history stream means the shard count changed.
    """
    wanted = set(layout.streams())
    foreign = [
        s for s in present if s.name not in wanted or s.layout_shards not in (None, layout.shards)
    ]
    if not foreign:
        return None
    names = ", ".join(s.name for s in foreign)
    messages = sum(s.messages for s in foreign)
    one = len(foreign) == 1
    made = {s.layout_shards for s in foreign if s.layout_shards is not None}
    if len(made) == 1:
        was = back = f"HISTORY_SHARDS={made.pop()}"
    else:
        lowest = max((stream_shard(s.name)[1] or 0) for s in foreign) + 1
        was = f"another HISTORY_SHARDS (at least {lowest})" if not made else "other values"
        back = "HISTORY_SHARDS to the value they were made with"
    rm = "; ".join(f"`nats stream rm {s.name}`" for s in foreign)
    return (
        f"{'stream' if one else 'streams'} {names} {'has' if one else 'have'} {messages} "
        f"messages but HISTORY_SHARDS={layout.shards}: {'it was' if one else 'they were'} made "
        f"with {was}, and a room's messages are read from the stream of its shard, so they "
        f"would not be found. Set {back}, or migrate the messages or remove the "
        f"{'stream' if one else 'streams'} ({rm}) and start again."
    )
