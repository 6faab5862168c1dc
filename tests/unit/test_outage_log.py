"""The outage log: each distinct problem once, repeats counted, a summary at a bounded rate."""

import logging

from relay.outage_log import OutageLog


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make(caplog):
    caplog.set_level(logging.DEBUG, logger="outage-test")
    clock = Clock()
    return clock, OutageLog(logging.getLogger("outage-test"), interval=60.0, clock=clock)


def messages(caplog):
    return [r.getMessage() for r in caplog.records]


def test_each_problem_once_then_a_summary_per_interval_then_recovery(caplog):
    clock, out = make(caplog)
    for i in range(1000):  # a librdkafka line every 100 ms, numbers changing
        out.log(
            logging.ERROR,
            "%s [%s] %s",
            "FAIL",
            "rdkafka#producer-1",
            f"Connect to 127.0.0.1:1 failed (after {i}ms, {i} identical error(s) suppressed)",
        )
        out.problem("pause", logging.WARNING, "Kafka unreachable: pausing")
        clock.now += 0.1
        out.summary_if_due(waiting=42)
    lines = messages(caplog)
    assert sum("Connect to" in line for line in lines if "repeated" not in line) == 1
    assert sum(line == "Kafka unreachable: pausing" for line in lines) == 1
    summaries = [line for line in lines if line.startswith("Kafka problems for")]
    assert len(summaries) == 1 and "42 rows waiting" in summaries[0]  # 100 s: one interval
    # Due at 60 s: by then 601 rounds of two reports, the first of each logged.
    assert "1200 repeated reports not logged" in summaries[0]
    out.recovered()
    assert messages(caplog)[-1].startswith("Kafka reachable again after 100s")
    out.problem("pause", logging.WARNING, "Kafka unreachable: pausing")
    assert messages(caplog)[-1] == "Kafka unreachable: pausing", "a new outage is told in full"


def test_no_summary_and_no_recovery_line_without_an_outage(caplog):
    clock, out = make(caplog)
    clock.now += 1000
    assert not out.summary_if_due()
    out.recovered()
    out.log(logging.INFO, "%s", "an informational line passes through")
    assert messages(caplog) == ["an informational line passes through"]


def test_expected_configuration_warning_is_not_a_problem(caplog):
    _, out = make(caplog)
    out.log(
        logging.WARNING,
        "%s [%s] %s",
        "CONFWARN",
        "p",
        "Configuration property enable.gapless.guarantee is experimental: ...",
    )
    assert not out.in_outage
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
