"""A loop failing round after round (the store down) logs its first failure, then one line a
minute with how many rounds failed, and one line when it recovers."""

from __future__ import annotations

from structlog.testing import capture_logs

from triage.logs import RepeatedFailure, get_logger


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_failure_repeated_every_second_is_logged_once_a_minute_and_its_end_once() -> None:
    clock = _Clock()
    failures = RepeatedFailure(
        get_logger("test"), "job_failed", "job_recovered", clock=clock, job="purge"
    )
    with capture_logs() as logs:
        failures.succeeded()  # nothing failed: nothing to say
        for _ in range(150):  # two and a half minutes, a round a second
            failures.failed("OperationalError: connection refused")
            clock.now += 1.0
        failures.succeeded()
        failures.succeeded()
        failures.failed("OperationalError: connection refused")
    events = [(entry["event"], entry.get("failed_rounds")) for entry in logs]
    assert events == [
        ("job_failed", None),
        ("job_failed", 60),
        ("job_failed", 60),
        ("job_recovered", None),
        ("job_failed", None),  # a new outage is logged at once
    ]
    assert all(entry["job"] == "purge" for entry in logs)
    assert logs[2]["failing_for_s"] == 120.0 and logs[3]["failed_for_s"] == 150.0
    assert logs[0]["log_level"] == "error" and logs[3]["log_level"] == "info"
