"""Runs read model: one row per run (summary and details) and run counts per workflow/status."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol
from uuid import UUID

from domain.values import JSON
from domain.workflow_run import ENDED, RunStatus, StepStatus
from projections.projection import Projection, handles, stored_name
from projections.records import EventRecord


class UnknownRunError(RuntimeError):
    """A record names a run whose start this projection never saw (a bug, never a race)."""


@dataclass
class StepRow:
    name: str
    status: str = StepStatus.PENDING.value
    attempts: int = 0
    output: JSON = None
    error: dict[str, JSON] | None = None
    compensable: bool = False
    started_at: datetime | None = None  # first attempt since the step was (re)opened
    finished_at: datetime | None = None  # completion, or failure for good
    retry_due_at: datetime | None = None

    def to_json(self) -> dict[str, JSON]:
        return {
            "name": self.name,
            "status": self.status,
            "attempts": self.attempts,
            "output": self.output,
            "error": self.error,
            "compensable": self.compensable,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "retry_due_at": _iso(self.retry_due_at),
        }

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> StepRow:
        return cls(
            name=data["name"],
            status=data["status"],
            attempts=data["attempts"],
            output=data["output"],
            error=data["error"],
            compensable=data["compensable"],
            started_at=_time(data["started_at"]),
            finished_at=_time(data["finished_at"]),
            retry_due_at=_time(data["retry_due_at"]),
        )


@dataclass
class SleepRow:
    name: str
    wake_at: datetime
    started_at: datetime
    fired_at: datetime | None = None

    @property
    def fired(self) -> bool:
        return self.fired_at is not None

    def to_json(self) -> dict[str, JSON]:
        return {
            "name": self.name,
            "wake_at": _iso(self.wake_at),
            "started_at": _iso(self.started_at),
            "fired_at": _iso(self.fired_at),
        }

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> SleepRow:
        return cls(
            name=data["name"],
            wake_at=_required_time(data["wake_at"]),
            started_at=_required_time(data["started_at"]),
            fired_at=_time(data["fired_at"]),
        )


@dataclass
class WaitRow:
    name: str
    event_name: str
    match: dict[str, JSON]
    timeout_at: datetime | None
    started_at: datetime
    outcome: str = "pending"  # pending | received | timed_out
    event_id: str | None = None
    data: JSON = None
    resolved_at: datetime | None = None

    def to_json(self) -> dict[str, JSON]:
        return {
            "name": self.name,
            "event_name": self.event_name,
            "match": self.match,
            "timeout_at": _iso(self.timeout_at),
            "started_at": _iso(self.started_at),
            "outcome": self.outcome,
            "event_id": self.event_id,
            "data": self.data,
            "resolved_at": _iso(self.resolved_at),
        }

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> WaitRow:
        return cls(
            name=data["name"],
            event_name=data["event_name"],
            match=data["match"],
            timeout_at=_time(data["timeout_at"]),
            started_at=_required_time(data["started_at"]),
            outcome=data["outcome"],
            event_id=data["event_id"],
            data=data["data"],
            resolved_at=_time(data["resolved_at"]),
        )


@dataclass
class ChildRow:
    name: str
    run_id: str
    workflow: str
    started_at: datetime
    outcome: str = "pending"  # pending | completed | failed
    output: JSON = None
    error: dict[str, JSON] | None = None
    finished_at: datetime | None = None

    def to_json(self) -> dict[str, JSON]:
        return {
            "name": self.name,
            "run_id": self.run_id,
            "workflow": self.workflow,
            "started_at": _iso(self.started_at),
            "outcome": self.outcome,
            "output": self.output,
            "error": self.error,
            "finished_at": _iso(self.finished_at),
        }

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> ChildRow:
        return cls(
            name=data["name"],
            run_id=data["run_id"],
            workflow=data["workflow"],
            started_at=_required_time(data["started_at"]),
            outcome=data["outcome"],
            output=data["output"],
            error=data["error"],
            finished_at=_time(data["finished_at"]),
        )


@dataclass
class SentEventRow:
    name: str
    event_name: str
    event_id: str
    sent_at: datetime

    def to_json(self) -> dict[str, JSON]:
        return {
            "name": self.name,
            "event_name": self.event_name,
            "event_id": self.event_id,
            "sent_at": _iso(self.sent_at),
        }

    @classmethod
    def from_json(cls, data: dict[str, JSON]) -> SentEventRow:
        return cls(
            name=data["name"],
            event_name=data["event_name"],
            event_id=data["event_id"],
            sent_at=_required_time(data["sent_at"]),
        )


@dataclass
class RunRow:
    """Everything the read side shows about a run, and enough to derive its status.

    Steps, sleeps, waits, children and sent events are keyed by name in first-start order
    (dicts keep insertion order); views store them as JSON lists.
    """

    run_id: UUID
    workflow: str
    key: str | None
    status: str
    input: JSON
    created_at: datetime
    updated_at: datetime
    version: int
    parent_run_id: UUID | None = None
    parent_step: str | None = None
    triggered_by: UUID | None = None
    output: JSON = None
    error: dict[str, JSON] | None = None
    cancel_requested: bool = False
    cancel_reason: str | None = None
    compensation: str | None = None  # the reason, while compensating
    steps: dict[str, StepRow] = field(default_factory=dict)
    sleeps: dict[str, SleepRow] = field(default_factory=dict)
    waits: dict[str, WaitRow] = field(default_factory=dict)
    children: dict[str, ChildRow] = field(default_factory=dict)
    sent_events: dict[str, SentEventRow] = field(default_factory=dict)

    @property
    def error_type(self) -> str | None:
        kind = self.error.get("type") if self.error else None
        return kind if isinstance(kind, str) else None

    def settle(self) -> None:
        """Derive a live run's status exactly as ``WorkflowRun._settle`` does (ADR 4)."""
        if self.status in ENDED or self.status == RunStatus.COMPENSATING:
            return
        if any(s.status == StepStatus.RUNNING for s in self.steps.values()):
            self.status = RunStatus.RUNNING.value
        elif any(w.outcome == "pending" for w in self.waits.values()) or any(
            c.outcome == "pending" for c in self.children.values()
        ):
            self.status = RunStatus.WAITING.value
        elif any(not s.fired for s in self.sleeps.values()):
            self.status = RunStatus.SLEEPING.value
        elif (
            self.status != RunStatus.QUEUED
            or self.steps
            or self.sleeps
            or self.waits
            or self.children
        ):
            self.status = RunStatus.RUNNING.value


class RunView(Protocol):
    """The rows the runs projection reads and writes."""

    def run(self, run_id: UUID) -> RunRow | None:
        """The run's row, or None if it has none yet."""

    def save_run(self, row: RunRow) -> None:
        """Insert or replace the run's row."""

    def count_run(self, workflow: str, status: str, delta: int) -> None:
        """Add ``delta`` to the number of ``workflow``'s runs that are in ``status``."""


class RunProjection(Projection[RunView]):
    """Mirrors each run's state from its events; a status change moves one count."""

    name = "runs"

    @handles("WorkflowRun.RunStarted")
    def _run_started(self, record: EventRecord) -> None:
        data = record.data
        row = RunRow(
            run_id=record.originator_id,
            workflow=data["workflow"],
            key=data["key"],
            status=RunStatus.QUEUED.value,
            input=data["input"],
            created_at=record.timestamp,
            updated_at=record.timestamp,
            version=record.version,
            parent_run_id=_uuid(data.get("parent_run_id")),
            parent_step=data.get("parent_step"),
            triggered_by=_uuid(data.get("triggered_by")),
        )
        self.view.save_run(row)
        self.view.count_run(row.workflow, row.status, 1)

    @handles("WorkflowRun.StepStarted")
    def _step_started(self, record: EventRecord) -> None:
        with self._run(record) as run:
            name = stored_name(record.data["step"])
            step = run.steps.setdefault(name, StepRow(name=name))
            if step.status == StepStatus.PENDING:
                step.started_at = record.timestamp
            step.status = StepStatus.RUNNING.value
            step.attempts = record.data["attempt"]
            step.finished_at = None
            step.retry_due_at = None
            run.settle()

    @handles("WorkflowRun.StepCompleted")
    def _step_completed(self, record: EventRecord) -> None:
        with self._run(record) as run:
            step = run.steps[stored_name(record.data["step"])]
            step.status = StepStatus.COMPLETED.value
            step.output = record.data["output"]
            step.error = None
            step.retry_due_at = None
            step.compensable = record.data["compensable"]
            step.finished_at = record.timestamp
            run.settle()

    @handles("WorkflowRun.StepFailed")
    def _step_failed(self, record: EventRecord) -> None:
        with self._run(record) as run:
            step = run.steps[stored_name(record.data["step"])]
            step.status = StepStatus.FAILED.value
            step.error = record.data["error"]
            step.finished_at = record.timestamp
            run.settle()

    @handles("WorkflowRun.RetryScheduled")
    def _retry_scheduled(self, record: EventRecord) -> None:
        with self._run(record) as run:
            step = run.steps[stored_name(record.data["step"])]
            step.status = StepStatus.RETRYING.value
            step.retry_due_at = _time(record.data["due_at"])
            step.finished_at = None  # the failure was not final after all
            run.settle()

    @handles("WorkflowRun.SleepStarted")
    def _sleep_started(self, record: EventRecord) -> None:
        with self._run(record) as run:
            name = stored_name(record.data["name"])
            wake_at = _required_time(record.data["wake_at"])
            run.sleeps[name] = SleepRow(name=name, wake_at=wake_at, started_at=record.timestamp)
            run.settle()

    @handles("WorkflowRun.TimerFired")
    def _timer_fired(self, record: EventRecord) -> None:
        with self._run(record) as run:
            run.sleeps[stored_name(record.data["name"])].fired_at = record.timestamp
            run.settle()

    @handles("WorkflowRun.WaitStarted")
    def _wait_started(self, record: EventRecord) -> None:
        with self._run(record) as run:
            data = record.data
            run.waits[stored_name(data["name"])] = WaitRow(
                name=stored_name(data["name"]),
                event_name=data["event_name"],
                match=data["match"],
                timeout_at=_time(data["timeout_at"]),
                started_at=record.timestamp,
            )
            run.settle()

    @handles("WorkflowRun.EventReceived")
    def _event_received(self, record: EventRecord) -> None:
        with self._run(record) as run:
            wait = run.waits[stored_name(record.data["name"])]
            wait.outcome = "received"
            wait.event_id = record.data["event_id"]
            wait.data = record.data["data"]
            wait.resolved_at = record.timestamp
            run.settle()

    @handles("WorkflowRun.WaitTimedOut")
    def _wait_timed_out(self, record: EventRecord) -> None:
        with self._run(record) as run:
            wait = run.waits[stored_name(record.data["name"])]
            wait.outcome = "timed_out"
            wait.resolved_at = record.timestamp
            run.settle()

    @handles("WorkflowRun.ChildStarted")
    def _child_started(self, record: EventRecord) -> None:
        with self._run(record) as run:
            data = record.data
            run.children[stored_name(data["name"])] = ChildRow(
                name=stored_name(data["name"]),
                run_id=data["child_run_id"],
                workflow=data["workflow"],
                started_at=record.timestamp,
            )
            run.settle()

    @handles("WorkflowRun.ChildCompleted")
    def _child_completed(self, record: EventRecord) -> None:
        with self._run(record) as run:
            child = run.children[stored_name(record.data["name"])]
            error = record.data["error"]
            child.outcome = "failed" if error is not None else "completed"
            child.output = record.data["output"]
            child.error = error
            child.finished_at = record.timestamp
            run.settle()

    @handles("WorkflowRun.EventSent")
    def _event_sent(self, record: EventRecord) -> None:
        with self._run(record) as run:
            data = record.data
            run.sent_events[stored_name(data["name"])] = SentEventRow(
                name=stored_name(data["name"]),
                event_name=data["event_name"],
                event_id=data["event_id"],
                sent_at=record.timestamp,
            )

    @handles("WorkflowRun.CancelRequested")
    def _cancel_requested(self, record: EventRecord) -> None:
        with self._run(record) as run:
            run.cancel_requested = True
            run.cancel_reason = record.data["reason"]

    @handles("WorkflowRun.CompensationStarted")
    def _compensation_started(self, record: EventRecord) -> None:
        with self._run(record) as run:
            run.status = RunStatus.COMPENSATING.value
            run.compensation = record.data["reason"]

    @handles("WorkflowRun.StepCompensated")
    def _step_compensated(self, record: EventRecord) -> None:
        with self._run(record) as run:
            run.steps[stored_name(record.data["step"])].status = StepStatus.COMPENSATED.value

    @handles("WorkflowRun.RunCompleted")
    def _run_completed(self, record: EventRecord) -> None:
        with self._run(record) as run:
            run.status = RunStatus.COMPLETED.value
            run.output = record.data["output"]

    @handles("WorkflowRun.RunFailed", "WorkflowRun.RunTimedOut")
    def _run_failed(self, record: EventRecord) -> None:
        with self._run(record) as run:
            run.status = RunStatus.FAILED.value
            run.error = record.data["error"]
            run.compensation = None

    @handles("WorkflowRun.RunCancelled")
    def _run_cancelled(self, record: EventRecord) -> None:
        with self._run(record) as run:
            run.status = RunStatus.CANCELLED.value
            run.compensation = None

    @handles("WorkflowRun.TaskDispatched")
    def _task_dispatched(self, record: EventRecord) -> None:
        """A hand-off to a worker changes nothing a reader of the run sees, but the row
        stays at the run's version (a run is dispatched as it starts: ADR 13)."""
        run = self.view.run(record.originator_id)
        if run is None:
            raise UnknownRunError(
                f"{record.qualified_type} at {record.position} names run "
                f"{record.originator_id}, whose start was never projected"
            )
        run.version = record.version
        self.view.save_run(run)

    @handles("WorkflowRun.RunRetried")
    def _run_retried(self, record: EventRecord) -> None:
        with self._run(record) as run:
            run.status = RunStatus.QUEUED.value
            run.error = None
            run.cancel_requested = False
            run.cancel_reason = None
            reopened = (StepStatus.FAILED, StepStatus.RETRYING, StepStatus.COMPENSATED)
            for step in run.steps.values():
                if step.status in reopened:
                    # As in the aggregate: these steps start again with a fresh budget.
                    step.status = StepStatus.PENDING.value
                    step.output = None
                    step.error = None
                    step.retry_due_at = None
                    step.started_at = None
                    step.finished_at = None

    @contextmanager
    def _run(self, record: EventRecord) -> Iterator[RunRow]:
        """Load the run's row, let the handler change it, save it and move its count."""
        run = self.view.run(record.originator_id)
        if run is None:
            raise UnknownRunError(
                f"{record.qualified_type} at {record.position} names run "
                f"{record.originator_id}, whose start was never projected"
            )
        before = run.status
        yield run
        run.updated_at = record.timestamp
        run.version = record.version
        if run.status != before:
            self.view.count_run(run.workflow, before, -1)
            self.view.count_run(run.workflow, run.status, 1)
        self.view.save_run(run)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _time(value: JSON) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _required_time(value: JSON) -> datetime:
    return datetime.fromisoformat(str(value))


def _uuid(value: JSON) -> UUID | None:
    return UUID(str(value)) if value is not None else None
