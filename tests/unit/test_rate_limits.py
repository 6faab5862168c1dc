"""Rate limits: their configuration, what one read's tokens admit, and the loop under limits
against the in-memory store on a fake clock (the shared buckets against the real server:
tests/integration/test_rate_limits.py)."""

import threading

import pytest

from relay.config import ConfigError, RelayConfig, parse_rate_limits
from relay.model import PendingMessage
from relay.rate_limits import MIN_THROTTLE_WAIT, GroupCaps, Limiter, RateLimit, Taken
from relay.relay import Relay
from relay.retry import RetryPolicy
from relay.testing import FakeClock, InMemoryStore, RecordingSink

BASE = {"OUTBOX_DSN": "postgresql://u@h/db", "OUTBOX_BOOTSTRAP_SERVERS": "k:9092"}


def test_entries_parse_with_default_burst_and_the_no_tenant_name():
    limits = parse_rate_limits("tenant:acme=100, topic:sms=0.5/s:20  tenant:-=7")
    assert limits == (
        RateLimit("tenant", "", 7.0, 7.0),
        RateLimit("tenant", "acme", 100.0, 100.0),
        RateLimit("topic", "sms", 0.5, 20.0),
    )
    assert [limit.label for limit in limits] == ["tenant:-", "tenant:acme", "topic:sms"]
    # A rate under one a second still lets one message through at a time.
    assert parse_rate_limits("topic:x=0.2") == (RateLimit("topic", "x", 0.2, 1.0),)
    assert parse_rate_limits("") == ()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tenant:acme=-5", "the rate must be a positive number"),
        ("tenant:acme=0", "the rate must be a positive number"),
        ("tenant:acme=nan", "the rate must be a positive number"),
        ("tenant:acme=inf", "the rate must be a positive number"),
        ("tenant:acme=fast", "the rate 'fast' is not a number"),
        ("tenant:acme=10:0.5", "the burst must be at least 1"),
        ("tenant:acme=10:-3", "the burst must be a positive number"),
        ("tenants:acme=10", "the scope is tenant or topic, not 'tenants'"),
        ("tenant:.acme=10", "invalid tenant '.acme'"),
        ("topic:a b=10", "write SCOPE:NAME=RATE"),
        ("topic:..=10", "invalid topic name '..'"),
        ("acme=10", "write SCOPE:NAME=RATE"),
        ("tenant:acme=10 tenant:acme=20", "tenant:acme is limited twice"),
    ],
)
def test_a_bad_entry_is_refused_at_start_with_one_line_naming_it(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        RelayConfig.from_env({**BASE, "OUTBOX_RATE_LIMITS": spec})
    assert "\n" not in str(info.value)


def message(row_id, tenant, topic, key=b"k"):
    return PendingMessage(row_id, "m", topic, key, b"", [], 0, None, 0, tenant)


def limiter(spec, now=lambda: 0.0):
    return Limiter(parse_rate_limits(spec), now)


def test_judge_cuts_each_group_to_a_prefix_and_counts_every_limit_a_row_falls_under():
    lim = limiter("tenant:a=1:10 topic:t=1:10")
    batch = [
        message(1, "a", "t"),
        message(2, "a", "u"),
        message(3, "b", "t"),
        message(4, "a", "t"),
        message(5, "a", "t"),  # tenant a's tokens are gone: cut, and a's later t rows too
        message(6, "b", "t"),
        message(7, "a", "u"),  # tenant a, group (a, u): cut
        message(8, "c", "v"),  # no limit applies
    ]
    assert lim.wants(batch) == [5, 5]
    verdict = lim.judge(batch, Taken(granted=[3, 5], available=[3.5, 10.0]), [False, False])
    assert [m.id for m in verdict.admitted] == [1, 2, 3, 4, 6, 8]
    assert verdict.held == [True, False]
    # Topic t gave 5 and 4 were sent (row 5 was cut by tenant a's shortage): one goes back.
    assert verdict.unused == [0, 1]
    # Tenant a had 0.5 token left after its three: the next is due in half a second.
    assert verdict.wait == pytest.approx(0.5)
    # The next read is capped by what the buckets held: half a token (none), six left.
    assert lim.caps() == GroupCaps(["a"], [0], ["t"], [6])


def test_tokens_a_limit_shares_across_groups_go_by_turn_not_to_the_oldest_rows():
    """A topic limit shared by two tenants: a backlog's old rows do not take every token."""
    lim = limiter("topic:sms=1:10")
    backlog = [message(i, "big", "sms") for i in range(1, 6)]
    new = message(100, "small", "sms")
    verdict = lim.judge([*backlog, new], Taken([2], [2.0]), [False])
    assert [m.id for m in verdict.admitted] == [1, 100]


def test_a_group_once_cut_stays_cut_even_when_a_later_row_would_fit():
    # Topic t's tokens run out at row 2 (group (a, t)); row 3 of the same group is not sent
    # either, though it would be the next in turn: the group's rows stay a prefix.
    lim = limiter("topic:t=1:5")
    batch = [message(1, "b", "t"), message(2, "a", "t"), message(3, "a", "t")]
    verdict = lim.judge(batch, Taken([1], [1.0]), [False])
    assert [m.id for m in verdict.admitted] == [1]


def test_caps_start_at_the_burst_and_refill_at_the_rate_since_the_last_look():
    clock = FakeClock()
    lim = limiter("tenant:a=2:8", clock.monotonic)
    assert lim.caps() == GroupCaps(["a"], [8], [], [])
    lim.judge([], Taken([0], [0.5]), [True])
    assert lim.caps().tenant_caps == [0]
    clock.advance(0.3)  # 0.5 + 0.6 = 1.1 tokens
    assert lim.caps().tenant_caps == [1]
    clock.advance(100)
    assert lim.caps().tenant_caps == [8]


def test_a_limit_whose_groups_were_left_out_holds_rows_back_and_waits_for_a_token():
    lim = limiter("tenant:a=2 topic:t=1:5")
    lim.judge([], Taken([0, 0], [0.5, 5.0]), [False, False])
    assert lim.caps() == GroupCaps(["a"], [0], ["t"], [5])
    # Only the limit at 0 left a group out: topic t, with tokens, held nothing back.
    assert lim.left_out({("a", "u")}) == [True, False]
    assert lim.left_out({("a", "t")}) == [True, False]
    verdict = lim.judge([message(1, "b", "u")], Taken([0, 0], [0.5, 0.0]), [True, False])
    assert verdict.admitted == [message(1, "b", "u")]
    assert verdict.held == [True, False]
    assert verdict.wait == pytest.approx(0.25)
    # Nothing under a limit, nothing left out: no take, nothing held, no wait.
    assert lim.judge([message(2, "b", "u")], None, [False, False]).wait is None


def make_relay(limits, batch_size=50):
    clock = FakeClock()
    store = InMemoryStore(clock.monotonic)
    sink = RecordingSink()
    relay = Relay(
        store,
        sink,
        reader=store,
        clock=clock,
        retry=RetryPolicy(random=lambda: 0.0),
        batch_size=batch_size,
        rate_limits=limits,
    )
    store.set_rate_limits(limits)
    return clock, store, sink, relay


def test_the_loop_holds_a_limited_tenant_to_its_rate_and_lets_the_others_through():
    limits = parse_rate_limits("tenant:bulk=10:10")
    clock, store, sink, relay = make_relay(limits)
    bulk = [store.insert("t", b"k%d" % (i % 3), b"%d" % i, tenant="bulk") for i in range(45)]
    other = [store.insert("t", b"k%d" % (i % 3), b"%d" % i, tenant="other") for i in range(30)]
    relay.run_once()
    relay.run_once()
    sent = [m.id for m in sink.sent]
    # The burst of 10 at once, every row of the other tenant, nothing more of bulk's.
    assert {r.id for r in other} <= set(sent)
    assert [i for i in sent if i <= bulk[-1].id] == [r.id for r in bulk[:10]]
    assert relay.throttled_for == pytest.approx(0.1)
    assert store.rate_buckets[("tenant", "bulk")].held_at is not None
    gauge = {"scope": "tenant", "name": "bulk"}
    assert relay.metrics.registry.get_sample_value("outbox_throttled", gauge) == 1
    # A second later, ten more; never a row dropped: all of them in the end, in id order.
    clock.advance(1.0)
    relay.run_once()
    assert len([m for m in sink.sent if m.tenant == "bulk"]) == 20
    for _ in range(10):
        clock.advance(1.0)
        relay.run_once()
    assert [m.id for m in sink.sent if m.tenant == "bulk"] == [r.id for r in bulk]
    assert all(r.status == "CONFIRMED" for r in bulk + other)
    assert relay.run_once() == 0 and relay.throttled_for is None
    assert relay.metrics.registry.get_sample_value("outbox_throttled", gauge) == 0


def test_a_topic_limit_applies_to_every_tenants_rows_of_the_topic():
    limits = parse_rate_limits("topic:sms=5")
    _, store, sink, relay = make_relay(limits)
    for tenant in ("a", "b"):
        for i in range(10):
            store.insert("sms", b"k", b"%d" % i, tenant=tenant)
    email = [store.insert("email", b"k", b"x", tenant="a") for _ in range(10)]
    relay.run_once()
    relay.run_once()
    assert len([m for m in sink.sent if m.topic == "sms"]) == 5
    assert {r.id for r in email} <= {m.id for m in sink.sent}


def test_replicas_draw_on_one_bucket():
    """Two relays on one store: between them, the burst and the rate, not twice over."""
    limits = parse_rate_limits("tenant:bulk=10:10")
    clock, store, sink, first = make_relay(limits, batch_size=4)
    second = Relay(
        store, sink, reader=store, clock=clock, batch_size=4, rate_limits=limits, name="second"
    )
    for i in range(100):
        store.insert("t", b"k%d" % i, b"x", tenant="bulk")
    for _ in range(3):
        first.run_once()
        second.run_once()
    for _ in range(20):
        clock.advance(0.1)
        first.run_once()
        second.run_once()
    # 10 at once, then 10 a second for 2 seconds.
    assert len(sink.sent) == 30


def test_the_loop_idles_for_the_next_token_but_not_less_than_the_floor():
    """Everything left waits for a limit of 1,000 a second: the loop does not come back every
    millisecond for one row, nor wait its full idle interval."""
    waits = []
    stop = threading.Event()

    def wait_for_work(seconds, _stop):
        waits.append(seconds)
        if len(waits) == 3:
            stop.set()

    limits = parse_rate_limits("tenant:bulk=1000:10")
    clock = FakeClock()
    store = InMemoryStore(clock.monotonic)
    store.set_rate_limits(limits)
    relay = Relay(
        store,
        RecordingSink(),
        reader=store,
        clock=clock,
        batch_size=50,
        rate_limits=limits,
        wait_for_work=wait_for_work,
        idle_poll_interval=5.0,
    )
    for i in range(30):
        store.insert("t", b"k", b"%d" % i, tenant="bulk")
    relay.run(stop)
    # The burst went, then two idle waits with every row left held back: the floor, not the
    # millisecond to the next token, nor the idle interval.
    assert waits[1:] == [MIN_THROTTLE_WAIT, MIN_THROTTLE_WAIT]


def test_reads_without_limited_rows_take_no_tokens():
    """With limits configured, a read of rows no limit covers, with no limited group left out,
    makes no statement on the buckets: what it costs without limits."""
    limits = parse_rate_limits("tenant:bulk=10:10")
    _, store, sink, relay = make_relay(limits)
    taken = []
    take = store.take_tokens
    store.take_tokens = lambda *a: taken.append(a) or take(*a)
    for i in range(20):
        store.insert("t", b"k%d" % i, b"x", tenant="other")
    relay.run_once()
    assert len(sink.sent) == 20 and taken == []
    store.insert("t", b"k", b"x", tenant="bulk")
    relay.run_once()
    assert len(sink.sent) == 21 and len(taken) == 1


def test_bookkeeping_that_fails_never_stops_delivery(caplog):
    """Saying the limits are in use, registering tenants and giving unused tokens back are
    bookkeeping: when the database refuses them (a role without the grant), rows still go."""

    class Refusing(InMemoryStore):
        def keep_rate_limits(self, limits):
            raise PermissionError("permission denied for table local_message_rate")

        def register_tenants(self, tenants):
            raise PermissionError("permission denied for table local_message_tenant")

        def return_tokens(self, limits, unused):
            raise PermissionError("permission denied for table local_message_rate")

    limits = parse_rate_limits("tenant:a=100:100 topic:sms=1:2")
    clock = FakeClock()
    store = Refusing(clock.monotonic)
    store.set_rate_limits(limits)
    sink = RecordingSink()
    relay = Relay(store, sink, reader=store, clock=clock, batch_size=50, rate_limits=limits)
    rows = [store.insert("sms", b"k%d" % i, b"x", tenant="a") for i in range(3)]
    relay.run_once()  # the burst: two rows
    clock.advance(1.0)
    # Another relay takes the sms token this relay expects: its row is read, tenant a gives a
    # token, sms none; a's token cannot be given back.
    store.rate_buckets[("topic", "sms")].tokens = -1.0
    relay.run_once()
    assert len(sink.sent) == 2
    clock.advance(2.0)
    relay.run_once()
    assert [m.id for m in sink.sent] == [r.id for r in rows]
    assert "could not register tenants a" in caplog.text
    assert "could not give unused rate-limit tokens back" in caplog.text
    assert "could not say the rate limits are in use" in caplog.text
