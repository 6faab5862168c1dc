"""What makes `outbox status --fail-if-lag / --fail-if-failed` exit 1 (relay.status)."""

from relay.status import OVERDUE_AFTER, health_problems


def report(lag=None, due_in=None, failed=0, sent=0):
    return {
        "oldest_pending_age_seconds": lag,
        "counts": {"FAILED": failed, "SENT": sent},
        "scheduled": {"next_due_in_seconds": due_in},
    }


def test_pending_lag_over_the_limit_is_a_problem():
    assert health_problems(report(lag=61.0), 60, False) == ["lag 61.0s > 60s"]
    assert health_problems(report(lag=59.0), 60, False) == []


def test_scheduled_rows_overdue_past_the_limit_are_lag_no_relay_promotes():
    # Rows due in the future, or just due (promoters look every second): not a problem.
    assert health_problems(report(due_in=3600.0), 60, False) == []
    assert health_problems(report(due_in=-1.0), 0, False) == []
    problems = health_problems(report(due_in=-120.0), 60, False)
    assert problems == ["scheduled rows overdue by 120.0s > 60s (no relay promoting)"]
    # A limit under the promoters' own slack counts from OVERDUE_AFTER.
    assert health_problems(report(due_in=-(OVERDUE_AFTER + 1)), 1, False) != []
    assert health_problems(report(due_in=-120.0), None, False) == []
