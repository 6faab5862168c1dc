"""Rate limits per tenant and per topic, shared by every relay of an outbox.

Each limit is a token bucket (RATE tokens a second, at most BURST kept) whose state is a row of
the local_message_rate table, so that the replicas draw on one bucket between them, not one
each. A read goes like this (Relay._fetch):

1. take: every limit's tokens are refilled for the time gone by and up to a batch's worth taken
   (queries.sql's take_tokens, one statement, the rows locked in one order);
2. the read leaves out the (tenant, topic) groups of the limits that got nothing: their rows
   stay PENDING and cost the read nothing (fetch_pending's skip_tenants and skip_topics);
3. admit: the batch is cut to what each limit granted, walking it in id order; once a group
   has a row cut, its later rows are cut too, so what is sent of a group is a prefix of its
   rows (a key's order within its topic holds, as in the read);
4. give back: what was taken and not used returns to the buckets, and the limits that held
   rows back note when (return_tokens), for `outbox status`.

A limit never drops a row: held rows stay PENDING and are read again once there are tokens.
Rows read and then not sent (a read ahead dropped after a lease renewal) have used their
tokens: a limit can send less than its rate, never more. Tokens taken by a relay that dies
between 1 and 4 are lost the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .model import PendingMessage

#: What a limit applies to: the rows of one tenant, or of one topic (every tenant's).
SCOPES = ("tenant", "topic")

#: How an operator names the rows without a tenant (as in `outbox list --tenant -`).
NO_TENANT = "-"


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


@dataclass
class Allowance:
    """What one read may send: the tokens each limit granted (take_tokens), and after admit(),
    what was used and which limits held rows back."""

    limits: Sequence[RateLimit]
    #: Whole tokens granted, per limit (in the order of `limits`).
    granted: Sequence[int]
    #: Tokens each bucket held before the grant (fractions included).
    available: Sequence[float]
    used: list[int] = field(default_factory=list)
    held: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.used = [0] * len(self.limits)
        self.held = [False] * len(self.limits)

    @property
    def skip_tenants(self) -> list[str]:
        """Tenants whose limit granted nothing: the read leaves them out."""
        return self._skipped("tenant")

    @property
    def skip_topics(self) -> list[str]:
        return self._skipped("topic")

    def _skipped(self, scope: str) -> list[str]:
        return [
            limit.name
            for limit, granted in zip(self.limits, self.granted, strict=True)
            if limit.scope == scope and granted < 1
        ]

    def admit(
        self, batch: Sequence[PendingMessage], waiting: Iterable[tuple[str, str]] = ()
    ) -> list[PendingMessage]:
        """The rows of BATCH (in id order) the tokens cover; a group's rows after one that is
        not covered are not either. WAITING: the (tenant, topic) groups known to have rows
        waiting (the relay's last backlog figures): a limit the read left out holds rows back
        if one of them is its."""
        left = list(self.granted)
        by_scope = {(limit.scope, limit.name): i for i, limit in enumerate(self.limits)}
        cut: set[tuple[str, str]] = set()
        admitted = []
        for message in batch:
            group = (message.tenant, message.topic)
            if group in cut:
                continue
            mine = [
                i
                for i in (by_scope.get(("tenant", group[0])), by_scope.get(("topic", group[1])))
                if i is not None
            ]
            short = [i for i in mine if left[i] < 1]
            if short:
                cut.add(group)
                for i in short:
                    self.held[i] = True
                continue
            for i in mine:
                left[i] -= 1
                self.used[i] += 1
            admitted.append(message)
        groups = set(waiting)
        for i, limit in enumerate(self.limits):
            if self.granted[i] < 1 and any(limit.applies_to(*g) for g in groups):
                self.held[i] = True
        return admitted

    def unused(self) -> list[int]:
        return [g - u for g, u in zip(self.granted, self.used, strict=True)]

    def wait(self) -> float | None:
        """Seconds until the first limit that held rows back has a token again (None: none
        held any): how long the relay may idle without making a held row late."""
        waits = [
            max(0.0, 1.0 - (available - used)) / limit.rate
            for limit, available, used, held in zip(
                self.limits, self.available, self.used, self.held, strict=True
            )
            if held
        ]
        return min(waits) if waits else None
