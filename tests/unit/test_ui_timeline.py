"""The run timeline is drawn from the run's history: one bar per step attempt, and more."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from infrastructure.http.models import HistoryEvent
from infrastructure.http.ui.timeline import MIN_WIDTH, build_timeline

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


class History:
    """Events one after another, each ``at`` seconds after the run started."""

    def __init__(self) -> None:
        self.events: list[HistoryEvent] = []

    def add(self, at: float, kind: str, **data: Any) -> History:
        n = len(self.events) + 1
        self.events.append(
            HistoryEvent(
                position=n, version=n, type=kind, timestamp=T0 + timedelta(seconds=at), data=data
            )
        )
        return self


def started(at: float = 0) -> History:
    return History().add(at, "RunStarted", workflow="shop", key=None, input={})


def test_each_step_attempt_is_a_bar_with_its_outcome_duration_and_error() -> None:
    boom = {"type": "CardDeclined", "message": "no", "traceback": "Traceback...\nCardDeclined"}
    history = (
        started()
        .add(1, "StepStarted", step="charge", attempt=1, retry_policy=None)
        .add(3, "StepFailed", step="charge", attempt=1, error=boom)
        .add(3, "RetryScheduled", step="charge", attempt=2, delay=2.0, due_at="later")
        .add(5, "StepStarted", step="charge", attempt=2, retry_policy=None)
        .add(6, "StepCompleted", step="charge", attempt=2, output={"id": 7}, compensable=False)
        .add(10, "RunCompleted", output={"ok": True})
    )
    timeline = build_timeline(history.events, now=T0 + timedelta(hours=1))

    first, second = timeline.bars
    assert (first.name, first.attempt, first.status, first.seconds) == ("charge", 1, "failed", 2.0)
    assert first.error == boom
    assert first.traceback == "Traceback...\nCardDeclined"
    assert first.note == "retry as attempt 2 after 2 s"
    assert (second.attempt, second.status, second.output) == (2, "completed", {"id": 7})
    assert timeline.retries == 1
    # drawn to scale on the run's 10 s, not up to "now": the run has ended
    assert timeline.seconds == 10.0
    assert (first.left, first.width) == pytest.approx((10.0, 20.0))
    assert (second.left, second.width) == pytest.approx((50.0, 10.0))
    assert [m.type for m in timeline.markers] == ["RunStarted", "RunCompleted"]
    assert timeline.markers[-1].left == pytest.approx(100.0)


def test_an_active_run_is_drawn_up_to_now_with_its_open_attempt_running() -> None:
    history = started().add(2, "StepStarted", step="ship", attempt=1, retry_policy=None)
    timeline = build_timeline(history.events, now=T0 + timedelta(seconds=4))

    (bar,) = timeline.bars
    assert (bar.status, bar.seconds, bar.finished_at) == ("running", None, None)
    assert timeline.finished_at is None
    assert (bar.left, bar.width) == pytest.approx((50.0, 50.0))


def test_an_attempt_replaced_by_a_newer_one_was_lost_with_its_worker() -> None:
    history = (
        started()
        .add(1, "StepStarted", step="ship", attempt=1, retry_policy=None)
        .add(4, "StepStarted", step="ship", attempt=2, retry_policy=None)
    )
    lost, retried = build_timeline(history.events, now=T0 + timedelta(seconds=5)).bars
    assert (lost.status, lost.seconds) == ("lost", 3.0)
    assert retried.status == "running"


def test_sleeps_waits_and_children_are_bars_too() -> None:
    child = "8f1c2b9e-0000-4000-8000-000000000001"
    history = (
        started()
        .add(1, "SleepStarted", name="cool-off", wake_at="2025-01-01T12:00:03+00:00")
        .add(3, "TimerFired", name="cool-off")
        .add(3, "WaitStarted", name="shipped", event_name="parcel", match={}, timeout_at=None)
        .add(5, "EventReceived", name="shipped", event_id=child, data={"parcel": 1})
        .add(5, "ChildStarted", name="invoice", child_run_id=child, workflow="invoicing")
        .add(8, "ChildCompleted", name="invoice", child_run_id=child, output=None, error=None)
        .add(8, "EventSent", name="announce", event_name="done", data={}, event_id=child)
    )
    sleep, wait, invoice = build_timeline(history.events, now=T0 + timedelta(seconds=9)).bars

    assert (sleep.kind, sleep.status, sleep.seconds) == ("sleep", "fired", 2.0)
    assert (wait.kind, wait.status, wait.output, wait.note) == (
        "wait",
        "received",
        {"parcel": 1},
        "for parcel",
    )
    assert (invoice.kind, invoice.status, invoice.link) == ("child", "completed", child)


def test_an_operator_retry_reopens_a_failed_run() -> None:
    error = {"type": "Boom", "message": "no"}
    history = (
        started()
        .add(1, "StepStarted", step="charge", attempt=1, retry_policy=None)
        .add(2, "StepFailed", step="charge", attempt=1, error=error)
        .add(2, "RunFailed", error=error)
        .add(5, "RunRetried")
        .add(6, "StepStarted", step="charge", attempt=2, retry_policy=None)
    )
    timeline = build_timeline(history.events, now=T0 + timedelta(seconds=8))
    assert timeline.finished_at is None
    assert timeline.seconds == 8.0
    assert [b.status for b in timeline.bars] == ["failed", "running"]
    assert "retried by an operator" in [m.text for m in timeline.markers]


def test_a_run_that_ends_mid_attempt_abandons_it_and_instant_steps_stay_visible() -> None:
    history = (
        started()
        .add(0, "StepStarted", step="a", attempt=1, retry_policy=None)
        .add(0, "StepCompleted", step="a", attempt=1, output=None, compensable=False)
        .add(1, "StepStarted", step="b", attempt=1, retry_policy=None)
        .add(1, "SleepStarted", name="nap", wake_at="2025-01-01T14:00:00+01:00")
        .add(2, "CancelRequested", reason="operator")
        .add(100, "RunCancelled", reason="operator")
    )
    a, b, nap = build_timeline(history.events, now=T0 + timedelta(hours=1)).bars
    assert a.width == MIN_WIDTH
    assert (b.status, b.seconds) == ("abandoned", 99.0)
    assert (nap.status, nap.seconds, nap.note) == (
        "abandoned",
        99.0,
        "wakes at 2025-01-01 13:00:00 UTC",
    )


def test_no_history_is_an_empty_timeline() -> None:
    timeline = build_timeline([], now=T0)
    assert (timeline.bars, timeline.markers, timeline.seconds) == ([], [], 0.0)
