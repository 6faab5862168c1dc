"""Rate limits per tenant and per topic, shared by every relay of an outbox.

Each limit is a token bucket (RATE tokens a second, at most BURST kept) whose state is a row of
the local_message_rate table, so that the replicas draw on one bucket between them, not one
each; the table is the one source of a limit's rate and burst (set_rate_limits, at a relay's
start). A read goes like this (Relay._fetch):

1. caps: each (tenant, topic) group's read is capped at what its limits' buckets held at this
   relay's last look, refilled since (an estimate: other relays draw on them too); a group
   capped at 0 is left out of the read, its rows not read at all, and named in the result
   (queries.sql's fetch_pending: capped, live);
2. take: the tokens the batch's rows under each limit want are taken, as many as there are
   (queries.sql's take_tokens, one statement, the rows locked in one order), and the limits
   that held rows back note when, for `outbox status`. Nothing is taken when no row of the
   batch is under a limit and no group was left out: without limits, or with the limited
   tenants idle, a read costs what it did;
3. judge: the batch is cut to what each limit gave, by turn (each group's first row, then each
   group's second...), as the read's rows are, so that a backlog's old rows do not take every
   token of a limit several groups share; once a group has a row cut, its later rows are cut
   too, so what is sent of a group is a prefix of its deliverable rows (a key's order within
   its topic holds, as in the read). Tokens a row under two limits took from one while the
   other had none for it are given back (return_tokens, only then).

A limit never drops a row: held rows stay PENDING and are read again once there are tokens.
Rows admitted and then not sent (a read ahead dropped after a lease renewal) have used their
tokens: a limit can send less than its rate, never more than its burst and its rate over the
time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .model import PendingMessage

#: What a limit applies to: the rows of one tenant, or of one topic (every tenant's).
SCOPES = ("tenant", "topic")

#: How an operator names the rows without a tenant (as in `outbox list --tenant -`).
NO_TENANT = "-"

#: The shortest idle wait while rows wait for a token and nothing else was sent: a limit of
#: thousands a second would otherwise have the relay read every few milliseconds for a row or
#: two. (After a read that sent rows, the loop waits as it does without limits.)
MIN_THROTTLE_WAIT = 0.02


@dataclass(frozen=True)
class RateLimit:
    scope: str
    #: The tenant ('' for rows without one) or the topic.
    name: str
    #: Messages a second.
    rate: float
    #: The most tokens kept: how many messages may go at once after a quiet spell.
    burst: float

    @property
    def label(self) -> str:
        """As the operator writes it: tenant:acme, tenant:- (no tenant), topic:payments."""
        return f"{self.scope}:{self.name or NO_TENANT}"

    def applies_to(self, tenant: str, topic: str) -> bool:
        return self.name == (tenant if self.scope == "tenant" else topic)


def refilled(tokens: float, limit: RateLimit, seconds: float) -> float:
    """A bucket's tokens SECONDS after it held TOKENS: refilled at the limit's rate, up to its
    burst (queries.sql's `available` is the same rule in SQL)."""
    return min(limit.burst, tokens + limit.rate * max(0.0, seconds))


class GroupCaps(NamedTuple):
    """The most rows of each limited tenant's and topic's groups a read may return
    (fetch_pending's cap_tenants, tenant_caps, cap_topics, topic_caps); 0 leaves them out."""

    tenants: list[str]
    tenant_caps: list[int]
    topics: list[str]
    topic_caps: list[int]


NO_CAPS = GroupCaps([], [], [], [])


class Taken(NamedTuple):
    """What take_tokens gave each limit (in the order of the limits), and what each bucket
    held before (fractions included)."""

    granted: list[int]
    available: list[float]


class Verdict(NamedTuple):
    """A read's outcome under the limits."""

    admitted: list[PendingMessage]
    #: Per limit: did it hold rows back (cut some, or its groups were left out)?
    held: list[bool]
    #: Seconds until the first limit that held rows back has a token again (None: none did).
    wait: float | None
    #: Per limit: tokens taken and not used (a row under two limits cut by the other one's
    #: shortage): given back (return_tokens).
    unused: list[int]


class Limiter:
    """One relay's side of its limits: the caps of the next read from its last look at the
    buckets, what a batch wants of each, and the cut."""

    def __init__(self, limits: Sequence[RateLimit], monotonic: Callable[[], float]):
        self.limits = tuple(limits)
        self._monotonic = monotonic
        # Each bucket's tokens at this relay's last look (None: not looked at yet).
        self._seen: list[tuple[float, float] | None] = [None] * len(self.limits)
        # Which limits the last caps() put at 0: only those hold back a group left out.
        self._at_zero = [False] * len(self.limits)

    def __bool__(self) -> bool:
        return bool(self.limits)

    def _estimate(self, i: int, now: float) -> float:
        seen, limit = self._seen[i], self.limits[i]
        if seen is None:
            return limit.burst
        tokens, at = seen
        return refilled(tokens, limit, now - at)

    def caps(self) -> GroupCaps:
        now = self._monotonic()
        caps = GroupCaps([], [], [], [])
        for i, limit in enumerate(self.limits):
            names, counts = (
                (caps.tenants, caps.tenant_caps)
                if limit.scope == "tenant"
                else (caps.topics, caps.topic_caps)
            )
            names.append(limit.name)
            counts.append(math.floor(self._estimate(i, now)))
            self._at_zero[i] = counts[-1] <= 0
        return caps

    def wants(self, batch: Sequence[PendingMessage]) -> list[int]:
        """How many rows of BATCH each limit covers."""
        index = self._index()
        wants = [0] * len(self.limits)
        for message in batch:
            for i in self._limits_of(index, message):
                wants[i] += 1
        return wants

    def left_out(self, groups: Collection[tuple[str, str]]) -> list[bool]:
        """Per limit: did it leave one of GROUPS (left out of the read with rows this relay
        could send) out, being at 0 in the last caps? (A group's other limits, with tokens
        left, hold nothing back.)"""
        return [
            self._at_zero[i] and any(limit.applies_to(*g) for g in groups)
            for i, limit in enumerate(self.limits)
        ]

    def judge(
        self, batch: Sequence[PendingMessage], taken: Taken | None, left_out: Sequence[bool]
    ) -> Verdict:
        """The rows of BATCH (in id order) the tokens TAKEN cover (None: nothing was taken,
        no row of BATCH being under a limit); a group's rows after one that is not covered
        are not either. The tokens go by turn, as the read's rows do (each group's first row,
        then each group's second, ...), not by id: under a limit shared by several groups (a
        topic's, across tenants) a backlog's old rows would otherwise take every token.
        Remembers what each bucket held, for the next caps."""
        now = self._monotonic()
        index = self._index()
        if taken is None:
            taken = Taken([0] * len(self.limits), [0.0] * len(self.limits))
            looked = False
        else:
            looked = True
        left = list(taken.granted)
        held = list(left_out)
        cut: set[tuple[str, str]] = set()
        admitted = []
        turns: dict[tuple[str, str], int] = {}
        by_turn = []
        for message in batch:
            group = (message.tenant, message.topic)
            turns[group] = turns.get(group, 0) + 1
            by_turn.append((turns[group], message.id, message))
        by_turn.sort(key=lambda t: t[:2])
        for _, _, message in by_turn:
            group = (message.tenant, message.topic)
            if group in cut:
                continue
            mine = self._limits_of(index, message)
            short = [i for i in mine if left[i] < 1]
            if short:
                cut.add(group)
                for i in short:
                    held[i] = True
                continue
            for i in mine:
                left[i] -= 1
            admitted.append(message)
        admitted.sort(key=lambda m: m.id)
        unused = [max(0, int(n)) for n in left]
        if looked:
            for i, (granted, available) in enumerate(zip(*taken, strict=True)):
                self._seen[i] = (available - granted + unused[i], now)
        waits = [
            max(0.0, 1.0 - self._estimate(i, now)) / limit.rate
            for i, limit in enumerate(self.limits)
            if held[i]
        ]
        return Verdict(admitted, held, min(waits) if waits else None, unused)

    def _index(self) -> dict[tuple[str, str], int]:
        return {(limit.scope, limit.name): i for i, limit in enumerate(self.limits)}

    @staticmethod
    def _limits_of(index: dict[tuple[str, str], int], message: PendingMessage) -> list[int]:
        found = (index.get(("tenant", message.tenant)), index.get(("topic", message.topic)))
        return [i for i in found if i is not None]


def throttle_wait(wait: float) -> float:
    """How long to idle for a limit's next token WAIT seconds away (MIN_THROTTLE_WAIT says
    why not less)."""
    return max(wait, MIN_THROTTLE_WAIT)
