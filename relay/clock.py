"""Time as a seam: the relay asks this for the time and for waits, so tests never sleep."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        """Wait up to SECONDS or until STOP is set; return True if STOP is set."""


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        return stop.wait(max(0.0, seconds))
