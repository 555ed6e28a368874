"""Structured logging: one JSON object per line on stderr."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

T = TypeVar("T")

_STD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats records as JSON lines; ``extra={...}`` fields become top-level keys."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_") and key != "color_message":
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(service: str, level: str = "info") -> None:
    """Route every logger (ours, uvicorn's, nats') to one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "litestar"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # uvicorn logs every WebSocket open/close at info: thousands of lines under load.
    logging.getLogger("uvicorn.error").setLevel(max(root.level, logging.WARNING))
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


class RateLimitedLog:
    """Logs at most one line per ``interval`` seconds for a kind of event, counting the rest.

    Bad input from outside must be visible but must not flood the log.
    """

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, msg: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        suppressed = self._suppressed.pop(kind, 0)
        self._last[kind] = now
        self.logger.warning(msg, extra={"kind": kind, "suppressed": suppressed, **fields})


class Malformed:
    """Bus input that does not parse: counted, dropped, logged (rate-limited) — the one way
    every service does it, so a bad publisher never crashes a service nor floods its log.

    ``count`` is called with the metric label of each drop (by default the log ``kind``).
    """

    def __init__(self, log: RateLimitedLog, count: Callable[[str], object]) -> None:
        self.log = log
        self._count = count

    def drop(
        self,
        kind: str,
        msg: str = "dropped malformed bus message",
        *,
        metric: str | None = None,
        **fields: Any,
    ) -> None:
        """Count one dropped input (label ``metric`` or ``kind``) and log it at most once per
        interval per ``kind``."""
        self._count(metric if metric is not None else kind)
        self.log.warning(kind, msg, **fields)

    def parse(
        self, kind: str, subject: str, parse: Callable[[], T], *, metric: str | None = None
    ) -> T | None:
        """``parse()``, or None (dropped, counted, logged) when it raises ValueError (which
        pydantic's ValidationError is)."""
        try:
            return parse()
        except ValueError as exc:
            self.drop(kind, metric=metric, subject=subject[:200], error=str(exc)[:300])
            return None
