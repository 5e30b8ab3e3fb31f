"""A run's timeline from its event history: one bar per step attempt, sleep, wait and child."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from domain.values import JSON
from infrastructure.http.models import HistoryEvent

MIN_WIDTH = 0.6
"""The narrowest bar, in percent of the run's span: an instant step stays visible."""


@dataclass
class Bar:
    """Something that took time in a run: a step attempt, a sleep, a wait, a child run."""

    kind: str  # "step", "sleep", "wait", "child"
    name: str
    started_at: datetime
    status: str  # running, completed, failed, lost; sleeping, fired; waiting, received...
    attempt: int | None = None
    finished_at: datetime | None = None  # None: still open
    output: JSON = None
    error: dict[str, JSON] | None = None
    note: str = ""
    """What happens next or what it is about: a scheduled retry, a wake-up time, an event."""
    link: str | None = None
    """The run id of a child run."""
    left: float = 0.0
    """Where the bar starts, in percent of the run's span."""
    width: float = MIN_WIDTH
    """How long it is, in percent of the run's span."""

    @property
    def seconds(self) -> float | None:
        """How long it took; None while it is still open."""
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    @property
    def traceback(self) -> str | None:
        found = (self.error or {}).get("traceback")
        return found if isinstance(found, str) and found else None


@dataclass(frozen=True)
class Marker:
    """Something that happened at an instant: the run started, was cancelled, sent an event."""

    at: datetime
    type: str
    text: str
    left: float = 0.0


@dataclass
class Timeline:
    started_at: datetime | None
    finished_at: datetime | None
    """When the run ended; None while it can still move."""
    until: datetime | None
    """The right edge of the chart: the run's end, or now while it is active."""
    bars: list[Bar] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        if self.started_at is None or self.until is None:
            return 0.0
        return (self.until - self.started_at).total_seconds()

    @property
    def retries(self) -> int:
        """Step attempts after the first."""
        return sum(1 for b in self.bars if b.kind == "step" and (b.attempt or 1) > 1)


_RUN_ENDS = {
    "RunCompleted": "completed",
    "RunFailed": "failed",
    "RunCancelled": "cancelled",
    "RunTimedOut": "timed out",
}


def build_timeline(events: Sequence[HistoryEvent], now: datetime) -> Timeline:
    """The timeline of a run whose history is ``events`` (in order), drawn up to ``now``
    while the run is active. Event types it does not draw are left to the raw history."""
    builder = _Builder()
    for event in events:
        builder.add(event)
    return builder.finish(now)


class _Builder:
    def __init__(self) -> None:
        self.started_at: datetime | None = None
        self.finished_at: datetime | None = None
        self.last: datetime | None = None
        self.bars: list[Bar] = []
        self.markers: list[Marker] = []
        self.attempts: dict[tuple[str, int], Bar] = {}
        self.open_step: dict[str, Bar] = {}  # the latest attempt of each step
        self.named: dict[tuple[str, str], Bar] = {}  # (kind, name) -> sleep, wait or child

    def add(self, e: HistoryEvent) -> None:
        at, d = e.timestamp, e.data
        self.last = at
        if self.started_at is None:
            self.started_at = at
        handler = getattr(self, f"_{e.type}", None)
        if handler is not None:
            handler(at, d)

    def finish(self, now: datetime) -> Timeline:
        start = self.started_at
        until = self.finished_at or (max(now, self.last) if self.last else None)
        timeline = Timeline(start, self.finished_at, until, self.bars, self.markers)
        if start is None or until is None:
            return timeline
        span = max((until - start).total_seconds(), 1e-6)

        def percent(at: datetime) -> float:
            return min(max((at - start).total_seconds() / span * 100, 0.0), 100.0)

        for bar in self.bars:
            bar.left = min(percent(bar.started_at), 100 - MIN_WIDTH)
            end = percent(bar.finished_at or until)
            bar.width = max(end - bar.left, MIN_WIDTH)
        timeline.markers = [
            Marker(m.at, m.type, m.text, min(percent(m.at), 100.0)) for m in self.markers
        ]
        return timeline

    def _mark(self, at: datetime, kind: str, text: str) -> None:
        self.markers.append(Marker(at, kind, text))

    def _bar(self, bar: Bar) -> Bar:
        self.bars.append(bar)
        return bar

    # ------------------------------------------------------------------------ the run
    def _RunStarted(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        self._mark(at, "RunStarted", f"started {d.get('workflow')}")

    def _RunRetried(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        self.finished_at = None  # a failed run that an operator retries moves again
        self._mark(at, "RunRetried", "retried by an operator")

    def _CancelRequested(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        reason = d.get("reason")
        self._mark(at, "CancelRequested", "cancel requested" + (f": {reason}" if reason else ""))

    def _CompensationStarted(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        steps = d.get("steps")
        names = ", ".join(str(s) for s in steps) if isinstance(steps, list) else ""
        self._mark(at, "CompensationStarted", f"compensating ({d.get('reason')}): {names}")

    def _StepCompensated(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        self._mark(at, "StepCompensated", f"compensated {d.get('step')}")

    def _EventSent(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        self._mark(at, "EventSent", f"sent {d.get('event_name')} ({d.get('name')})")

    def _ended(self, at: datetime, kind: str) -> None:
        self.finished_at = at
        for bar in self.bars:  # nothing runs, sleeps or waits on once the run has ended
            if bar.finished_at is None:
                bar.finished_at, bar.status = at, "abandoned"
        self._mark(at, kind, _RUN_ENDS[kind])

    def _RunCompleted(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        self._ended(at, "RunCompleted")

    def _RunFailed(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        self._ended(at, "RunFailed")

    def _RunCancelled(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        self._ended(at, "RunCancelled")

    def _RunTimedOut(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        self._ended(at, "RunTimedOut")

    # ---------------------------------------------------------------------- the steps
    def _StepStarted(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        step, attempt = str(d.get("step")), _int(d.get("attempt"))
        previous = self.open_step.get(step)
        if previous is not None and previous.finished_at is None:
            # A newer attempt replaced one that never reported: its worker was lost.
            previous.finished_at, previous.status = at, "lost"
        bar = self._bar(Bar("step", step, at, "running", attempt=attempt))
        self.attempts[(step, attempt)] = bar
        self.open_step[step] = bar

    def _StepCompleted(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        bar = self._attempt(at, d)
        bar.finished_at, bar.status, bar.output = at, "completed", d.get("output")

    def _StepFailed(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        bar = self._attempt(at, d)
        error = d.get("error")
        bar.finished_at, bar.status = at, "failed"
        bar.error = error if isinstance(error, dict) else {"message": str(error)}

    def _RetryScheduled(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        step, attempt = str(d.get("step")), _int(d.get("attempt"))
        failed = self.attempts.get((step, attempt - 1))
        if failed is not None:
            failed.note = f"retry as attempt {attempt} after {_float(d.get('delay')):g} s"

    def _attempt(self, at: datetime, d: dict[str, JSON]) -> Bar:
        step, attempt = str(d.get("step")), _int(d.get("attempt"))
        bar = self.attempts.get((step, attempt))
        if bar is None:  # an outcome without its start (never expected): draw it at once
            bar = self._bar(Bar("step", step, at, "running", attempt=attempt))
            self.attempts[(step, attempt)] = bar
        return bar

    # -------------------------------------------------------- sleeps, waits, children
    def _SleepStarted(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        name = str(d.get("name"))
        bar = Bar("sleep", name, at, "sleeping", note=f"wakes at {_time(d.get('wake_at'))}")
        self.named[("sleep", name)] = self._bar(bar)

    def _TimerFired(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        bar = self.named.get(("sleep", str(d.get("name"))))
        if bar is not None:
            bar.finished_at, bar.status = at, "fired"

    def _WaitStarted(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        name = str(d.get("name"))
        timeout = d.get("timeout_at")
        note = f"for {d.get('event_name')}" + (f" until {_time(timeout)}" if timeout else "")
        self.named[("wait", name)] = self._bar(Bar("wait", name, at, "waiting", note=note))

    def _EventReceived(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        bar = self.named.get(("wait", str(d.get("name"))))
        if bar is not None:
            bar.finished_at, bar.status, bar.output = at, "received", d.get("data")

    def _WaitTimedOut(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        bar = self.named.get(("wait", str(d.get("name"))))
        if bar is not None:
            bar.finished_at, bar.status = at, "timed_out"

    def _ChildStarted(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        name, child = str(d.get("name")), str(d.get("child_run_id"))
        bar = Bar("child", name, at, "running", note=f"{d.get('workflow')}", link=child)
        self.named[("child", name)] = self._bar(bar)

    def _ChildCompleted(self, at: datetime, d: dict[str, JSON]) -> None:  # noqa: N802
        bar = self.named.get(("child", str(d.get("name"))))
        if bar is None:
            return
        error = d.get("error")
        bar.finished_at, bar.output = at, d.get("output")
        bar.status = "failed" if error else "completed"
        bar.error = error if isinstance(error, dict) else None


def _int(value: JSON) -> int:
    return value if isinstance(value, int) else 0


def _float(value: JSON) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _time(value: JSON) -> str:
    """An ISO time as the UI shows times: to the second, in UTC."""
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")
