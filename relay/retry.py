"""What to do with a failed delivery: count it or not, back off how long, give up when."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .model import TOPIC_ERROR_TTL, Failed, FailureKind, FailureUpdate, PendingMessage

#: Failures that leave the row untouched: not the message's fault, or not even tried.
NO_WRITE = frozenset(
    {FailureKind.OUTAGE, FailureKind.UNKNOWN, FailureKind.DEFERRED, FailureKind.ISOLATE}
)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 12
    base: float = 1.0
    cap: float = 300.0
    #: For failures retrying cannot fix (FailureKind.PERMANENT): a few tries in case someone
    #: fixes the cause at once (creates the topic, grants the ACL), then FAILED, so that the
    #: blocked key shows within seconds instead of after max_attempts backoffs.
    max_permanent_attempts: int = 3
    #: ... each at least this long after the last: a topic created or an ACL granted a moment
    #: later gets a real second chance (the sink caches a missing topic for TOPIC_ERROR_TTL,
    #: so a sooner retry would read the same cached answer; a broker's metadata may also lag a
    #: creation), and the row is FAILED within about 15 s.
    permanent_retry_delay: float = TOPIC_ERROR_TTL + 2.0
    #: Uniform in [0, 1); injectable so that tests get fixed delays.
    random: Callable[[], float] = random.random

    def delay(self, attempts: int) -> float:
        """Exponential backoff with jitter (half fixed, half random), capped."""
        raw = min(self.cap, self.base * (2 ** max(0, attempts - 1)))
        return raw * (0.5 + 0.5 * self.random())

    def _delay(self, kind: FailureKind, attempts: int) -> float:
        delay = self.delay(attempts)
        if kind is FailureKind.PERMANENT:
            return max(delay, self.permanent_retry_delay)
        return delay

    def attempts_allowed(self, kind: FailureKind) -> int:
        if kind is FailureKind.PERMANENT:
            return min(self.max_permanent_attempts, self.max_attempts)
        return self.max_attempts

    def updates(
        self, failures: Sequence[Failed], messages: dict[int, PendingMessage]
    ) -> list[FailureUpdate]:
        """The rows to write for FAILURES. Outages and unknown outcomes write nothing: the
        rows stay PENDING and are sent again once the relay's circuit breaker lets it."""
        out = []
        for failure in failures:
            if failure.kind in NO_WRITE:
                continue
            attempts = messages[failure.id].attempts + 1
            give_up = attempts >= self.attempts_allowed(failure.kind)
            out.append(
                FailureUpdate(
                    failure.id,
                    1,
                    f"{failure.kind.value}: {failure.error}",
                    give_up,
                    0.0 if give_up else self._delay(failure.kind, attempts),
                )
            )
        return out


@dataclass
class CircuitBreaker:
    """Backs the whole relay off while the cluster is down, without touching any row."""

    base: float = 0.5
    cap: float = 30.0
    failures: int = 0

    def record(self, delivered: int, outage: int) -> float:
        """Seconds to wait before the next batch."""
        if delivered or not outage:
            self.failures = 0
            return 0.0
        self.failures += 1
        return min(self.cap, self.base * (2 ** (self.failures - 1)))
