"""The WorkflowRun aggregate: one per run; its events are the run's durable history."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.errors import (
    AttemptMismatchError,
    InvalidCommandError,
    InvalidStateError,
    NotPendingError,
    RetriesExhaustedError,
    RunNotActiveError,
    StepAlreadyCompletedError,
    StepNotFoundError,
    StepsPendingError,
    SupersededError,
)
from domain.ids import inbound_event_id, sent_event_id
from domain.values import (
    JSON,
    RetryPolicy,
    Timeouts,
    check_key,
    check_name,
    check_step_name,
)


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SLEEPING = "sleeping"
    WAITING = "waiting"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


START = "start"
"""The reason of a run's first hand-off."""
EAGER = "eager"
"""The reason of a run's first hand-off to the worker in its starter's process (ADR 17):
no task is queued; the scheduler's lease hands it to the queue if that worker goes."""
EAGER_EXPIRED = "eager_expired"
"""The reason of the hand-off that takes an eagerly started run from a worker that no
longer holds it (it died, or gave the run back)."""

ENDED = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
"""A run in one of these accepts nothing, except a failed run that an operator retries."""

_LIVE = frozenset({RunStatus.RUNNING, RunStatus.SLEEPING, RunStatus.WAITING})

ALLOWED_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: _LIVE | {RunStatus.COMPENSATING} | ENDED,
    RunStatus.RUNNING: _LIVE | {RunStatus.COMPENSATING} | ENDED,
    RunStatus.SLEEPING: _LIVE | {RunStatus.COMPENSATING} | ENDED,
    RunStatus.WAITING: _LIVE | {RunStatus.COMPENSATING} | ENDED,
    RunStatus.COMPENSATING: frozenset({RunStatus.FAILED, RunStatus.CANCELLED}),
    RunStatus.FAILED: frozenset({RunStatus.QUEUED}),
    RunStatus.COMPLETED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
}
"""The status graph: every status change a run may make (staying put is always allowed)."""


class StepStatus(StrEnum):
    PENDING = "pending"  # not started since the run was last retried by an operator
    RUNNING = "running"
    RETRYING = "retrying"  # an attempt failed and the next one is scheduled
    FAILED = "failed"  # failed for good: no attempt left or not retryable
    COMPLETED = "completed"
    COMPENSATED = "compensated"


class CompensationReason(StrEnum):
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


@dataclass
class StepState:
    name: str
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0  # attempts ever started: never decreases
    attempts_base: int = 0  # attempts made before the last operator retry
    retry_policy: RetryPolicy | None = None  # the step's own policy, if it has one
    output: JSON = None
    error: dict[str, JSON] | None = None
    compensable: bool = False
    completed_seq: int | None = None  # completion order, for reverse-order compensation
    retry_due_at: datetime | None = None


@dataclass
class SleepState:
    wake_at: datetime
    fired: bool = False


@dataclass
class WaitState:
    event_name: str
    match: dict[str, JSON]
    timeout_at: datetime | None
    outcome: str = "pending"  # pending | received | timed_out
    event_id: UUID | None = None
    data: JSON = None


@dataclass
class ChildState:
    run_id: UUID
    workflow: str
    outcome: str = "pending"  # pending | completed | failed
    output: JSON = None
    error: dict[str, JSON] | None = None


@dataclass
class CompensationState:
    reason: CompensationReason
    error: dict[str, JSON] | None


def error_body(error: object) -> dict[str, JSON]:
    """Validate an error description: ``{"type": str, "message": str, ...}``."""
    if not isinstance(error, dict):
        raise InvalidCommandError("an error must be an object with 'type' and 'message'")
    kind, message = error.get("type"), error.get("message")
    if not isinstance(kind, str) or not kind or not isinstance(message, str):
        raise InvalidCommandError("an error needs a non-empty string 'type' and a 'message'")
    return dict(error)


class WorkflowRun(Aggregate):
    """A run of a workflow. Public methods decide; ``_``-prefixed @event methods assign."""

    # ----------------------------------------------------------------------------- events
    class RunStarted(Aggregate.Created):
        """v2 added ``dispatched``: the run was handed to its queue in the same transaction
        (a TaskDispatched follows), so the scheduler has no start to dispatch (ADR 13)."""

        class_version = 2
        workflow: str
        key: str | None
        input: JSON
        retry_policy: dict[str, JSON]
        timeouts: dict[str, JSON]
        parent_run_id: UUID | None
        parent_step: str | None
        triggered_by: UUID | None
        dispatched: bool

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["dispatched"] = False  # every run then waited for the scheduler

    class StepStarted(Aggregate.Event):
        step: str
        attempt: int
        retry_policy: dict[str, JSON] | None

    class StepCompleted(Aggregate.Event):
        step: str
        attempt: int
        output: JSON
        compensable: bool

    class StepFailed(Aggregate.Event):
        """v2 made ``error`` a structured object; v1 stored a message and an error type."""

        class_version = 2
        step: str
        attempt: int
        error: dict[str, JSON]

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["error"] = {
                "type": state.pop("error_type", None) or "Error",
                "message": state["error"],
            }

    class RetryScheduled(Aggregate.Event):
        step: str
        attempt: int
        delay: float
        due_at: datetime

    class SleepStarted(Aggregate.Event):
        name: str
        wake_at: datetime

    class TimerFired(Aggregate.Event):
        name: str

    class WaitStarted(Aggregate.Event):
        name: str
        event_name: str
        match: dict[str, JSON]
        timeout_at: datetime | None

    class EventReceived(Aggregate.Event):
        name: str
        event_id: UUID
        data: JSON

    class WaitTimedOut(Aggregate.Event):
        name: str

    class ChildStarted(Aggregate.Event):
        name: str
        child_run_id: UUID
        workflow: str

    class ChildCompleted(Aggregate.Event):
        name: str
        child_run_id: UUID
        output: JSON
        error: dict[str, JSON] | None

    class EventSent(Aggregate.Event):
        name: str
        event_name: str
        data: JSON
        event_id: UUID

    class CancelRequested(Aggregate.Event):
        reason: str | None

    class CompensationStarted(Aggregate.Event):
        reason: str
        error: dict[str, JSON] | None
        steps: list[str]

    class StepCompensated(Aggregate.Event):
        step: str

    class RunCompleted(Aggregate.Event):
        output: JSON

    class RunFailed(Aggregate.Event):
        error: dict[str, JSON]

    class RunCancelled(Aggregate.Event):
        reason: str | None

    class RunTimedOut(Aggregate.Event):
        error: dict[str, JSON]

    class RunRetried(Aggregate.Event):
        pass

    class TaskDispatched(Aggregate.Event):
        """The run was handed to a worker queue; ``dispatch`` numbers the hand-offs."""

        reason: str
        cause: int
        dispatch: int
        queue: str

    # --------------------------------------------------------------------------- creation
    @classmethod
    def start(
        cls,
        run_id: UUID,
        workflow: str,
        input: JSON,
        key: str | None = None,
        retry_policy: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        parent_run_id: UUID | None = None,
        parent_step: str | None = None,
        triggered_by: UUID | None = None,
        queue: str | None = None,
        eager: bool = False,
    ) -> WorkflowRun:
        """Start a run; with ``queue``, also hand it to that worker queue at once (its
        workflow has no concurrency limit, so nothing can hold it back: ADR 13). With
        ``eager`` too, the hand-off is to the starter's own worker instead (ADR 17)."""
        check_name("workflow", workflow)
        check_key("key", key)
        if queue is not None:
            check_name("queue", queue)
        if (parent_run_id is None) != (parent_step is None):
            raise InvalidCommandError("a child run needs both parent_run_id and parent_step")
        run = cls._create(
            cls.RunStarted,
            id=run_id,
            workflow=workflow,
            key=key,
            input=input,
            retry_policy=(retry_policy or RetryPolicy()).to_json(),
            timeouts=(timeouts or Timeouts()).to_json(),
            parent_run_id=parent_run_id,
            parent_step=parent_step,
            triggered_by=triggered_by,
            dispatched=queue is not None,
        )
        if queue is not None:
            # No global position is known before the insert: cause 0 is "its own start".
            run._task_dispatched(EAGER if eager else START, 0, 1, queue)
        return run

    @event(RunStarted)
    def __init__(
        self,
        workflow: str,
        key: str | None,
        input: JSON,
        retry_policy: dict[str, JSON],
        timeouts: dict[str, JSON],
        parent_run_id: UUID | None,
        parent_step: str | None,
        triggered_by: UUID | None,
        dispatched: bool,
    ) -> None:
        self.workflow = workflow
        self.key = key
        self.input = input
        self.retry_policy = RetryPolicy.from_json(retry_policy)
        self.timeouts = Timeouts.from_json(timeouts)
        self.parent_run_id = parent_run_id
        self.parent_step = parent_step
        self.triggered_by = triggered_by
        self.status = RunStatus.QUEUED
        self.output: JSON = None
        self.error: dict[str, JSON] | None = None
        self.steps: dict[str, StepState] = {}
        self.sleeps: dict[str, SleepState] = {}
        self.waits: dict[str, WaitState] = {}
        self.children: dict[str, ChildState] = {}
        self.sent_events: dict[str, UUID] = {}
        self.cancel_requested = False
        self.cancel_reason: str | None = None
        self.compensation: CompensationState | None = None
        self.completions = 0
        self.dispatches = 0  # hand-offs to a worker so far: the fencing token of the latest
        self.last_cause = 0  # global position of the event that caused the latest hand-off
        self.dispatched_at_start = dispatched
        self.held_eagerly = False  # the latest hand-off is an eager start's (ADR 17)

    # ------------------------------------------------------------------------------ steps
    def start_step(
        self,
        step: str,
        attempt: int,
        retry_policy: RetryPolicy | None = None,
        dispatch: int | None = None,
    ) -> None:
        """Record that a step attempt starts. A worker holding an older hand-off than the
        latest (``dispatch``) is refused, so two workers never run the next step at once."""
        check_step_name("step", step)
        state = self.steps.get(step)
        if state is not None and state.status is not StepStatus.PENDING:
            if 1 <= attempt <= state.attempts:
                return  # a redelivered start, or a stale one: already recorded
            if state.status in (StepStatus.COMPLETED, StepStatus.COMPENSATED):
                raise StepAlreadyCompletedError(self.id, step)
            if state.status is StepStatus.FAILED:
                raise InvalidStateError(f"step {step!r} of run {self.id} has failed for good")
        if dispatch is not None and dispatch != self.dispatches:
            raise SupersededError(self.id, dispatch, self.dispatches)
        self._check_can_progress()
        attempts = state.attempts if state else 0
        if attempt != attempts + 1:
            raise AttemptMismatchError(
                f"step {step!r} of run {self.id} expects attempt {attempts + 1}, not {attempt}"
            )
        policy = self._policy_for(state, retry_policy)
        base = state.attempts_base if state else 0
        if not policy.allows_attempt(attempt - base):
            raise RetriesExhaustedError(
                f"step {step!r} of run {self.id} has used all {policy.max_attempts} attempts"
            )
        self._step_started(step, attempt, retry_policy.to_json() if retry_policy else None)

    @event(StepStarted)
    def _step_started(self, step: str, attempt: int, retry_policy: dict[str, JSON] | None) -> None:
        state = self.steps.setdefault(step, StepState(name=step))
        state.status = StepStatus.RUNNING
        state.attempts = attempt
        state.retry_due_at = None
        if retry_policy is not None:
            state.retry_policy = RetryPolicy.from_json(retry_policy)
        self._settle()

    def complete_step(
        self, step: str, attempt: int, output: JSON, compensable: bool = False
    ) -> None:
        self._check_not_ended()
        state = self._started_step(step, attempt)
        if state.status is not StepStatus.RUNNING:
            return  # the first outcome stands: completed, or failed and then retried
        self._step_completed(step, attempt, output, compensable)
        self._finish_cancel_if_idle()

    @event(StepCompleted)
    def _step_completed(self, step: str, attempt: int, output: JSON, compensable: bool) -> None:
        state = self.steps[step]
        state.status = StepStatus.COMPLETED
        state.output = output
        state.error = None
        state.retry_due_at = None
        state.compensable = compensable
        self.completions += 1
        state.completed_seq = self.completions
        self._settle()

    def fail_step(
        self,
        step: str,
        attempt: int,
        error: dict[str, JSON],
        now: datetime,
        retryable: bool = True,
        rand: float = 0.5,
    ) -> None:
        """Record a failed attempt and decide, by the retry policy, whether to retry it."""
        error = error_body(error)
        self._check_not_ended()
        state = self._started_step(step, attempt)
        if state.status is not StepStatus.RUNNING or attempt < state.attempts:
            return  # a duplicate, or a stale attempt that a newer one has replaced
        self._step_failed(step, attempt, error)
        policy = self._policy_for(state)
        if (
            retryable
            and policy.is_retryable(str(error["type"]))
            and policy.allows_attempt(attempt - state.attempts_base + 1)
            and not self.cancel_requested
            and self.status is not RunStatus.COMPENSATING
        ):
            delay = policy.next_delay(attempt - state.attempts_base, rand)
            self._retry_scheduled(step, attempt + 1, delay.total_seconds(), now + delay)
        self._finish_cancel_if_idle()

    @event(StepFailed)
    def _step_failed(self, step: str, attempt: int, error: dict[str, JSON]) -> None:
        state = self.steps[step]
        state.status = StepStatus.FAILED
        state.error = error
        self._settle()

    @event(RetryScheduled)
    def _retry_scheduled(self, step: str, attempt: int, delay: float, due_at: datetime) -> None:
        state = self.steps[step]
        state.status = StepStatus.RETRYING
        state.retry_due_at = due_at
        self._settle()

    # ----------------------------------------------------------------------------- sleeps
    def start_sleep(self, name: str, wake_at: datetime) -> None:
        check_step_name("sleep", name)
        if name in self.sleeps:
            return  # memoised: the first wake-up time stands
        self._check_can_progress()
        self._sleep_started(name, wake_at)

    @event(SleepStarted)
    def _sleep_started(self, name: str, wake_at: datetime) -> None:
        self.sleeps[name] = SleepState(wake_at=wake_at)
        self._settle()

    def fire_timer(self, name: str) -> None:
        sleep = self.sleeps.get(name)
        if sleep is None:
            raise NotPendingError(f"run {self.id} has no sleep {name!r}")
        if sleep.fired:
            return  # fired already: timers fire once
        self._check_can_resume()
        self._timer_fired(name)

    @event(TimerFired)
    def _timer_fired(self, name: str) -> None:
        self.sleeps[name].fired = True
        self._settle()

    # ------------------------------------------------------------------------------ waits
    def start_wait(
        self,
        name: str,
        event_name: str,
        match: dict[str, JSON] | None = None,
        timeout_at: datetime | None = None,
    ) -> None:
        check_step_name("wait", name)
        check_name("event", event_name)
        if match is not None and not isinstance(match, dict):
            raise InvalidCommandError("match must be an object of field values")
        if name in self.waits:
            return  # memoised
        self._check_can_progress()
        self._wait_started(name, event_name, dict(match or {}), timeout_at)

    @event(WaitStarted)
    def _wait_started(
        self, name: str, event_name: str, match: dict[str, JSON], timeout_at: datetime | None
    ) -> None:
        self.waits[name] = WaitState(event_name=event_name, match=match, timeout_at=timeout_at)
        self._settle()

    def receive_event(self, name: str, event_id: UUID, event_name: str, data: JSON) -> None:
        wait = self._wait(name)
        if wait.outcome != "pending":
            return  # the first event (or the timeout) wins
        self._check_can_resume()
        if event_name != wait.event_name or not matches(wait.match, data):
            raise InvalidStateError(f"event {event_name!r} does not match wait {name!r}")
        self._event_received(name, event_id, data)

    @event(EventReceived)
    def _event_received(self, name: str, event_id: UUID, data: JSON) -> None:
        wait = self.waits[name]
        wait.outcome = "received"
        wait.event_id = event_id
        wait.data = data
        self._settle()

    def time_out_wait(self, name: str) -> None:
        wait = self._wait(name)
        if wait.outcome != "pending":
            return
        self._check_can_resume()
        self._wait_timed_out(name)

    @event(WaitTimedOut)
    def _wait_timed_out(self, name: str) -> None:
        self.waits[name].outcome = "timed_out"
        self._settle()

    # --------------------------------------------------------------------------- children
    def start_child(self, name: str, child_run_id: UUID, workflow: str) -> None:
        check_step_name("child", name)
        check_name("workflow", workflow)
        if name in self.children:
            return
        self._check_can_progress()
        self._child_started(name, child_run_id, workflow)

    @event(ChildStarted)
    def _child_started(self, name: str, child_run_id: UUID, workflow: str) -> None:
        self.children[name] = ChildState(run_id=child_run_id, workflow=workflow)
        self._settle()

    def complete_child(
        self, name: str, output: JSON = None, error: dict[str, JSON] | None = None
    ) -> None:
        child = self.children.get(name)
        if child is None:
            raise NotPendingError(f"run {self.id} has no child {name!r}")
        if error is not None:
            error = error_body(error)
        if child.outcome != "pending":
            return
        self._check_can_resume()
        self._child_completed(name, child.run_id, output, error)

    @event(ChildCompleted)
    def _child_completed(
        self, name: str, child_run_id: UUID, output: JSON, error: dict[str, JSON] | None
    ) -> None:
        child = self.children[name]
        child.outcome = "failed" if error is not None else "completed"
        child.output = output
        child.error = error
        self._settle()

    # ---------------------------------------------------------------------- sending events
    def send_event(self, name: str, event_name: str, data: JSON) -> UUID:
        """Record that the run sends an event; returns the inbound event's stable id."""
        check_step_name("send", name)
        check_name("event", event_name)
        if name in self.sent_events:
            return self.sent_events[name]
        self._check_can_progress()
        event_id = inbound_event_id(sent_event_id(self.id, name))
        self._event_sent(name, event_name, data, event_id)
        return event_id

    @event(EventSent)
    def _event_sent(self, name: str, event_name: str, data: JSON, event_id: UUID) -> None:
        self.sent_events[name] = event_id

    # ------------------------------------------------------------------- ending the run
    def complete(self, output: JSON, after_steps: Sequence[str] = ()) -> None:
        """Complete the run; with ``after_steps``, only once those steps have completed
        (their completions were sent just before, unanswered: ADR 16)."""
        if self.status is RunStatus.COMPLETED:
            return
        self._check_not_ended()
        if self.status is RunStatus.COMPENSATING:
            raise InvalidStateError(f"run {self.id} is compensating and cannot complete")
        pending = [
            step
            for step in dict.fromkeys(after_steps)
            if (state := self.steps.get(step)) is None or state.status is not StepStatus.COMPLETED
        ]
        if pending:
            raise StepsPendingError(self.id, pending)
        self._run_completed(output)

    @event(RunCompleted)
    def _run_completed(self, output: JSON) -> None:
        self.status = RunStatus.COMPLETED
        self.output = output

    def fail(self, error: dict[str, JSON]) -> None:
        """Fail the run: compensate completed steps first (in reverse order) if any."""
        error = error_body(error)
        if self.status is RunStatus.COMPENSATING:
            return  # already on its way to an end
        self._check_not_ended()
        self._end(CompensationReason.FAILED, error)

    def time_out(self) -> None:
        if self.status is RunStatus.COMPENSATING:
            return
        self._check_not_ended()
        limit = f" of {self.timeouts.run:g} s" if self.timeouts.run else ""
        error: dict[str, JSON] = {
            "type": "RunTimeout",
            "message": f"run exceeded its timeout{limit}",
        }
        self._end(CompensationReason.TIMED_OUT, error)

    def request_cancel(self, reason: str | None = None) -> None:
        if self.status is RunStatus.CANCELLED or self.cancel_requested:
            return  # cancelling twice is cancelling once
        self._check_not_ended()
        if self.status is RunStatus.COMPENSATING:
            raise InvalidStateError(f"run {self.id} is already compensating after a failure")
        self._cancel_requested(reason)
        self._finish_cancel_if_idle()

    @event(CancelRequested)
    def _cancel_requested(self, reason: str | None) -> None:
        self.cancel_requested = True
        self.cancel_reason = reason

    def compensate_step(self, step: str) -> None:
        """Record that a step's compensation ran; end the run after the last one."""
        state = self.steps.get(step)
        if state is None:
            raise StepNotFoundError(self.id, step)
        if state.status is StepStatus.COMPENSATED:
            return
        if self.status is not RunStatus.COMPENSATING or self.compensation is None:
            raise InvalidStateError(f"run {self.id} is {self.status}, not compensating")
        pending = self.compensations_pending()
        if step not in pending:
            raise InvalidStateError(f"step {step!r} of run {self.id} has nothing to compensate")
        if step != pending[0]:
            raise InvalidStateError(f"compensate {pending[0]!r} before {step!r} (reverse order)")
        self._step_compensated(step)
        if not self.compensations_pending():
            self._finish(self.compensation.reason, self.compensation.error)

    @event(StepCompensated)
    def _step_compensated(self, step: str) -> None:
        self.steps[step].status = StepStatus.COMPENSATED

    @event(CompensationStarted)
    def _compensation_started(
        self, reason: str, error: dict[str, JSON] | None, steps: list[str]
    ) -> None:
        self.status = RunStatus.COMPENSATING
        self.compensation = CompensationState(reason=CompensationReason(reason), error=error)

    @event(RunFailed)
    def _run_failed(self, error: dict[str, JSON]) -> None:
        self.status = RunStatus.FAILED
        self.error = error
        self.compensation = None

    @event(RunCancelled)
    def _run_cancelled(self, reason: str | None) -> None:
        self.status = RunStatus.CANCELLED
        self.compensation = None

    @event(RunTimedOut)
    def _run_timed_out(self, error: dict[str, JSON]) -> None:
        self.status = RunStatus.FAILED
        self.error = error
        self.compensation = None

    def retry(self) -> None:
        """An operator resumes a failed run from its failed step, with fresh attempts."""
        if self.status is not RunStatus.FAILED:
            raise InvalidStateError(f"run {self.id} is {self.status}; only a failed run retries")
        self._run_retried()

    @event(RunRetried)
    def _run_retried(self) -> None:
        self.status = RunStatus.QUEUED
        self.error = None
        self.cancel_requested = False
        self.cancel_reason = None
        for state in self.steps.values():
            if state.status in (StepStatus.FAILED, StepStatus.RETRYING, StepStatus.COMPENSATED):
                # Compensated effects were undone, so those steps must run again too.
                state.status = StepStatus.PENDING
                state.attempts_base = state.attempts
                state.output = None
                state.error = None
                state.retry_due_at = None
                state.completed_seq = None

    # ----------------------------------------------------------------------- hand-offs
    def dispatch(self, reason: str, cause: int, queue: str) -> None:
        """Hand the run to a worker queue because of the event at position ``cause``.

        A cause at or before the last one is a redelivered trigger: nothing happens.
        ``eager_expired`` takes the run from an eager start's worker (ADR 17): only while
        that hand-off is the latest and the run is queued or running; otherwise the run
        has moved on (it suspended, ended or was handed off since) and nothing happens.
        """
        check_step_name("dispatch reason", reason)
        check_name("queue", queue)
        if reason == EAGER:
            raise InvalidCommandError("only a run's start can hand it off eagerly")
        if cause <= self.last_cause:
            return
        if reason == START and self.dispatched_at_start:
            return  # handed off as it started; a scheduler of before ADR 13 asks again
        if reason == EAGER_EXPIRED and not (
            self.held_eagerly and self.status in (RunStatus.QUEUED, RunStatus.RUNNING)
        ):
            return
        self._check_not_ended()
        self._task_dispatched(reason, cause, self.dispatches + 1, queue)

    @event(TaskDispatched)
    def _task_dispatched(self, reason: str, cause: int, dispatch: int, queue: str) -> None:
        self.dispatches = dispatch
        self.last_cause = cause
        self.held_eagerly = reason == EAGER

    # -------------------------------------------------------------------------- queries
    @property
    def is_ended(self) -> bool:
        return self.status in ENDED

    def compensations_pending(self) -> list[str]:
        """Completed compensable steps not yet compensated, latest completion first."""
        done = [
            s
            for s in self.steps.values()
            if s.status is StepStatus.COMPLETED and s.compensable and s.completed_seq
        ]
        return [s.name for s in sorted(done, key=lambda s: s.completed_seq or 0, reverse=True)]

    def steps_running(self) -> list[str]:
        return [s.name for s in self.steps.values() if s.status is StepStatus.RUNNING]

    # ------------------------------------------------------------------------ internals
    def _check_not_ended(self) -> None:
        if self.status in ENDED:
            raise RunNotActiveError(self.id, self.status)

    def _check_can_progress(self) -> None:
        """New work (a step, sleep, wait, child, send) needs a live, uncancelled run."""
        self._check_not_ended()
        if self.status is RunStatus.COMPENSATING:
            raise InvalidStateError(f"run {self.id} is compensating: no new work may start")
        if self.cancel_requested:
            raise InvalidStateError(f"run {self.id} is being cancelled: no new work may start")

    def _check_can_resume(self) -> None:
        self._check_not_ended()
        if self.status is RunStatus.COMPENSATING:
            raise InvalidStateError(f"run {self.id} is compensating and cannot resume")

    def _started_step(self, step: str, attempt: int) -> StepState:
        state = self.steps.get(step)
        if state is None or state.attempts == 0:
            raise StepNotFoundError(self.id, step)
        if not 1 <= attempt <= state.attempts:
            raise AttemptMismatchError(
                f"step {step!r} of run {self.id} has started {state.attempts} attempt(s), "
                f"not attempt {attempt}"
            )
        return state

    def _wait(self, name: str) -> WaitState:
        wait = self.waits.get(name)
        if wait is None:
            raise NotPendingError(f"run {self.id} has no wait {name!r}")
        return wait

    def _end(self, reason: CompensationReason, error: dict[str, JSON] | None) -> None:
        pending = self.compensations_pending()
        if pending:
            self._compensation_started(reason.value, error, pending)
        else:
            self._finish(reason, error)

    def _finish(self, reason: CompensationReason, error: dict[str, JSON] | None) -> None:
        if reason is CompensationReason.CANCELLED:
            self._run_cancelled(self.cancel_reason)
        elif reason is CompensationReason.TIMED_OUT:
            self._run_timed_out(error or {})
        else:
            self._run_failed(error or {})

    def _policy_for(
        self, state: StepState | None, override: RetryPolicy | None = None
    ) -> RetryPolicy:
        if override is not None:
            return override
        if state is not None and state.retry_policy is not None:
            return state.retry_policy
        return self.retry_policy

    def _finish_cancel_if_idle(self) -> None:
        """A requested cancel takes effect as soon as no step attempt is in flight."""
        if not self.cancel_requested or self.status in ENDED:
            return
        if self.status is RunStatus.COMPENSATING or self.steps_running():
            return
        self._end(CompensationReason.CANCELLED, None)

    def _settle(self) -> None:
        """Derive a live run's status from what it has in flight (assignment only)."""
        if self.status in ENDED or self.status is RunStatus.COMPENSATING:
            return
        if self.steps_running():
            self.status = RunStatus.RUNNING
        elif any(w.outcome == "pending" for w in self.waits.values()) or any(
            c.outcome == "pending" for c in self.children.values()
        ):
            self.status = RunStatus.WAITING
        elif any(not s.fired for s in self.sleeps.values()):
            self.status = RunStatus.SLEEPING
        elif (
            self.status is not RunStatus.QUEUED
            or self.steps
            or self.sleeps
            or self.waits
            or self.children
        ):
            self.status = RunStatus.RUNNING


def matches(match: dict[str, JSON], data: JSON) -> bool:
    """An event matches a wait when every ``match`` field equals the event's field."""
    if not match:
        return True
    if not isinstance(data, dict):
        return False
    return all(k in data and data[k] == v for k, v in match.items())
