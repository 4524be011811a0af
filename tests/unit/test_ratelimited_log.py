"""A hostile peer cannot flood the log: a burst per interval, then a count of what was held."""
from __future__ import annotations

import logging

from ringfence._log import RateLimitedLog


def test_a_burst_then_silence_then_the_count_of_what_was_held(monkeypatch):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.ratelimit")
    logger.addHandler(Keep())
    clock = [100.0]
    monkeypatch.setattr("ringfence._log.time.monotonic", lambda: clock[0])
    limited = RateLimitedLog(logger, interval=5.0, burst=3)
    for _ in range(1000):
        limited.warning("refused", reason="bad_size")
    assert len(records) == 3 and limited.suppressed == 997
    clock[0] += 5.0
    limited.warning("refused", reason="bad_size")
    assert len(records) == 4 and records[-1].kv == {"reason": "bad_size", "suppressed": 997}
