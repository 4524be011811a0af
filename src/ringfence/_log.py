"""key=value logging for daemons and the CLI.

Library code only calls ``logging.getLogger(__name__)``; the CLI calls
:func:`configure_logging` once. Per-device context (domid, devid, kind) is carried in a
contextvar so that every line a driver logs names the device it concerns.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

log_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "ringfence_log_context", default={})


@contextlib.contextmanager
def logging_context(**fields: Any) -> Iterator[None]:
    """Add key=value fields to every log line emitted inside the block."""
    token = log_context.set({**log_context.get(), **fields})
    try:
        yield
    finally:
        log_context.reset(token)


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields.update(log_context.get())
        fields.update(getattr(record, "kv", {}))
        fields["msg"] = record.getMessage()
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


def configure_logging(verbosity: int = 0) -> None:
    level = logging.WARNING - 10 * min(verbosity, 2) if verbosity else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class RateLimitedLog:
    """At most ``burst`` lines per ``interval`` seconds (a hostile peer must not flood the
    log); the next line after a quiet spell says how many were held back."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0, burst: int = 5) -> None:
        self.logger, self.interval, self.burst = logger, interval, burst
        self._window_start = -interval
        self._in_window = self.suppressed = 0

    def warning(self, msg: str, **kv: Any) -> None:
        now = time.monotonic()
        if now - self._window_start >= self.interval:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self.burst:
            self.suppressed += 1
            return
        self._in_window += 1
        if self.suppressed:
            kv["suppressed"], self.suppressed = self.suppressed, 0
        self.logger.warning(msg, extra={"kv": kv})
