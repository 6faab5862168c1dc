"""Quiet outages: each distinct Kafka problem is logged once, then a summary at a bounded rate.

While Kafka is unreachable, librdkafka reports the same failure every few hundred milliseconds
(as a log line and again through the error callback), and the relay fails batch after batch:
logged as they come, an hour of outage is six figures of lines. Here every problem has a key
(its text with the numbers taken out); the first of each key is logged as it comes, repeats are
counted, and a summary (for how long, how many repeats, how many rows wait) is logged at most
once per ``interval``. When a message gets through again, one line says so and the slate is
cleared, so the next outage is reported in full.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable

_NUMBERS = re.compile(r"\d+")

#: librdkafka warns about settings the relay chose on purpose (see relay.kafka.sink).
_EXPECTED = ("enable.gapless.guarantee is experimental",)


class OutageLog:
    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._log = logger
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._repeats: Counter[str] = Counter()
        self._seen: set[str] = set()
        self._since: float | None = None
        self._last_summary = float("-inf")

    @property
    def in_outage(self) -> bool:
        return self._since is not None

    def problem(self, key: str, level: int, text: str) -> None:
        """Log TEXT if no problem with KEY was logged since the last recovery; else count it."""
        with self._lock:
            now = self._clock()
            if self._since is None:
                self._since = now
                self._last_summary = now
            if key in self._seen:
                self._repeats[key] += 1
                return
            self._seen.add(key)
        self._log.log(level, "%s", text)

    def log(self, level: int, msg: str, *args) -> None:
        """The logger interface confluent-kafka calls with librdkafka's own log lines."""
        text = msg % args if args else msg
        if any(expected in text for expected in _EXPECTED):
            level = logging.DEBUG
        if level < logging.WARNING:
            self._log.log(level, "%s", text)
            return
        # "FAIL [rdkafka#producer-1] [thrd:...]: ...: Connect to ... failed: ... (after 0ms
        # in state CONNECT, 4 identical error(s) suppressed)": same problem, other numbers.
        self.problem(_NUMBERS.sub("#", text), level, text)

    def summary_if_due(self, waiting: int | None = None) -> bool:
        """Log one line about the problems not logged again, at most once per interval."""
        with self._lock:
            now = self._clock()
            if self._since is None or now - self._last_summary < self.interval:
                return False
            repeats, self._repeats = self._repeats, Counter()
            self._last_summary = now
            since = self._since
        top = ", ".join(f"{n} x {key[:80]}" for key, n in repeats.most_common(3))
        self._log.warning(
            "Kafka problems for %.0fs: %d repeated reports not logged%s%s",
            now - since,
            sum(repeats.values()),
            f" ({top})" if top else "",
            "" if waiting is None else f"; {waiting} rows waiting",
        )
        return True

    def recovered(self) -> None:
        """Kafka took a message again: say so once, and report the next outage in full."""
        with self._lock:
            if self._since is None:
                return
            lasted = self._clock() - self._since
            repeats = sum(self._repeats.values())
            self._since = None
            self._seen.clear()
            self._repeats.clear()
        self._log.warning(
            "Kafka reachable again after %.0fs (%d repeated reports not logged)", lasted, repeats
        )
