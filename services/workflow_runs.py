"""WorkflowRuns: the application service that loads, decides on and saves every aggregate."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import RecordConflictError, Recording
from eventsourcing.utils import Environment

from domain.errors import (
    ConcurrencyConflictError,
    EventNotFoundError,
    InvalidStateError,
    RunNotFoundError,
    UnknownWorkflowError,
)
from domain.ids import child_run_id, inbound_event_id, run_id_for, workflow_type_id
from domain.inbound_event import InboundEvent
from domain.values import JSON, check_name
from domain.workflow_run import RunStatus, WorkflowRun
from domain.workflow_type import WorkflowType
from services import commands as c
from services.clock import Clock, SystemClock

A = TypeVar("A", bound=Aggregate)
R = TypeVar("R")

MAX_CONFLICT_RETRIES = 8
"""Optimistic-concurrency retries before a command gives up with ``conflict``."""


@dataclass(frozen=True)
class Applied:
    """A command was applied; ``position`` is the global position of its last event.

    When the command changed nothing (a repeat), ``position`` is the store's head, which
    is at least the position of every event the command's aggregate has.
    """

    position: int


@dataclass(frozen=True)
class RunStartedReply(Applied):
    run_id: UUID
    created: bool


@dataclass(frozen=True)
class EventSentReply(Applied):
    event_id: UUID
    created: bool


class WorkflowRuns(Application[UUID]):
    """One event store (one notification log) for runs, inbound events and workflow types."""

    name = "ledgerflow"

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        clock: Clock | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(env=env)
        self.clock = clock or SystemClock()
        self.rand = rand

    def construct_env(self, name: str, env: Mapping[str, str] | None = None) -> Environment:
        """Configuration comes only from the settings the composition root passes in.

        eventsourcing would otherwise read ``os.environ`` too; the composition root
        (infrastructure.bootstrap) is the one place that does.
        """
        return Environment(name, {**type(self).env, **(env or {})})

    # ------------------------------------------------------------------ client commands
    def start_run(self, cmd: c.StartRun) -> RunStartedReply:
        workflow = self.get_workflow_type(cmd.workflow)
        run_id = run_id_for(cmd.workflow, cmd.key)

        def attempt() -> RunStartedReply:
            if cmd.key is not None and self._exists(run_id):
                return RunStartedReply(self._head(), run_id, created=False)
            run = workflow.new_run(run_id, cmd.input, key=cmd.key)
            return RunStartedReply(self._save(run), run_id, created=True)

        return self._retrying(attempt)

    def send_event(self, cmd: c.SendEvent) -> EventSentReply:
        event_id = inbound_event_id(cmd.id)

        def attempt() -> EventSentReply:
            if cmd.id is not None and self._exists(event_id):
                return EventSentReply(self._head(), event_id, created=False)
            inbound = InboundEvent.receive(event_id, cmd.name, cmd.data, external_id=cmd.id)
            return EventSentReply(self._save(inbound), event_id, created=True)

        return self._retrying(attempt)

    def cancel_run(self, cmd: c.CancelRun) -> Applied:
        return self._update_run(cmd.run_id, lambda run: run.request_cancel(cmd.reason))

    def retry_run(self, cmd: c.RetryRun) -> Applied:
        return self._update_run(cmd.run_id, lambda run: run.retry())

    # ------------------------------------------------------------------ worker commands
    def register_workflow(self, cmd: c.RegisterWorkflow) -> Applied:
        type_id = workflow_type_id(cmd.name)
        definition = WorkflowType.definition_of(
            cmd.triggers, cmd.retry_policy, cmd.timeouts, cmd.concurrency, cmd.queue
        )

        def attempt() -> Applied:
            try:
                workflow = self._load(type_id, WorkflowType)
                workflow.redefine(definition)
            except AggregateNotFoundError:
                workflow = WorkflowType.register(
                    type_id,
                    cmd.name,
                    cmd.triggers,
                    cmd.retry_policy,
                    cmd.timeouts,
                    cmd.concurrency,
                    cmd.queue,
                )
            if cmd.worker_id is not None:
                workflow.add_worker(cmd.worker_id)
            return Applied(self._save(workflow))

        return self._retrying(attempt)

    def start_step(self, cmd: c.StartStep) -> Applied:
        return self._update_run(
            cmd.run_id, lambda run: run.start_step(cmd.step, cmd.attempt, cmd.retry_policy)
        )

    def complete_step(self, cmd: c.CompleteStep) -> Applied:
        return self._update_run(
            cmd.run_id,
            lambda run: run.complete_step(cmd.step, cmd.attempt, cmd.output, cmd.compensable),
        )

    def fail_step(self, cmd: c.FailStep) -> Applied:
        return self._update_run(
            cmd.run_id,
            lambda run: run.fail_step(
                cmd.step,
                cmd.attempt,
                cmd.error.model_dump(),
                now=self.clock.now(),
                retryable=cmd.retryable,
                rand=self.rand(),
            ),
        )

    def start_sleep(self, cmd: c.StartSleep) -> Applied:
        def decide(run: WorkflowRun) -> None:
            wake_at = cmd.until or self.clock.now() + timedelta(seconds=cmd.seconds or 0)
            run.start_sleep(cmd.name, wake_at)

        return self._update_run(cmd.run_id, decide)

    def fire_timer(self, cmd: c.FireTimer) -> Applied:
        return self._update_run(cmd.run_id, lambda run: run.fire_timer(cmd.name))

    def start_wait(self, cmd: c.StartWait) -> Applied:
        def decide(run: WorkflowRun) -> None:
            timeout_at = (
                self.clock.now() + timedelta(seconds=cmd.timeout_seconds)
                if cmd.timeout_seconds is not None
                else None
            )
            run.start_wait(cmd.name, cmd.event_name, cmd.match, timeout_at)

        return self._update_run(cmd.run_id, decide)

    def deliver_event(self, cmd: c.DeliverEvent) -> Applied:
        """Wake a waiting run and record on the event that it woke it, in one transaction."""

        def attempt() -> Applied:
            run = self.get_run(cmd.run_id)
            inbound = self.get_inbound_event(cmd.event_id)
            run.receive_event(cmd.name, inbound.id, inbound.name, inbound.data)
            if run.waits[cmd.name].event_id == inbound.id:
                inbound.record_woken_run(run.id, cmd.name)
            return Applied(self._save(run, inbound))

        return self._retrying(attempt)

    def time_out_wait(self, cmd: c.TimeOutWait) -> Applied:
        return self._update_run(cmd.run_id, lambda run: run.time_out_wait(cmd.name))

    def start_child(self, cmd: c.StartChild) -> Applied:
        """Start a child run and record it on its parent, in one transaction."""
        workflow = self.get_workflow_type(cmd.workflow)

        def attempt() -> Applied:
            parent = self.get_run(cmd.run_id)
            child_id = child_run_id(parent.id, cmd.name)
            parent.start_child(cmd.name, child_id, cmd.workflow)
            child = None
            if not self._exists(child_id):
                child = workflow.new_run(
                    child_id, cmd.input, parent_run_id=parent.id, parent_step=cmd.name
                )
            return Applied(self._save(parent, child))

        return self._retrying(attempt)

    def resolve_child(self, cmd: c.ResolveChild) -> Applied:
        def decide(parent: WorkflowRun) -> None:
            state = parent.children.get(cmd.name)
            if state is None or state.outcome != "pending":
                parent.complete_child(cmd.name)  # raises, or is a no-op
                return
            child = self.get_run(state.run_id)
            if child.status is RunStatus.COMPLETED:
                parent.complete_child(cmd.name, output=child.output)
            elif child.status is RunStatus.FAILED:
                parent.complete_child(cmd.name, error=child.error)
            elif child.status is RunStatus.CANCELLED:
                error: dict[str, JSON] = {
                    "type": "ChildCancelled",
                    "message": f"child run {child.id} was cancelled",
                }
                parent.complete_child(cmd.name, error=error)
            else:
                raise InvalidStateError(f"child run {child.id} is still {child.status}")

        return self._update_run(cmd.run_id, decide)

    def emit_event(self, cmd: c.EmitEvent) -> EventSentReply:
        """Record a run's sent event and the inbound event itself, in one transaction."""

        def attempt() -> EventSentReply:
            run = self.get_run(cmd.run_id)
            event_id = run.send_event(cmd.name, cmd.event_name, cmd.data)
            inbound = None
            if not self._exists(event_id):
                inbound = InboundEvent.receive(
                    event_id, cmd.event_name, cmd.data, sent_by_run=run.id
                )
            position = self._save(run, inbound)
            return EventSentReply(position, event_id, created=inbound is not None)

        return self._retrying(attempt)

    def complete_run(self, cmd: c.CompleteRun) -> Applied:
        return self._update_run(cmd.run_id, lambda run: run.complete(cmd.output))

    def fail_run(self, cmd: c.FailRun) -> Applied:
        return self._update_run(cmd.run_id, lambda run: run.fail(cmd.error.model_dump()))

    def time_out_run(self, cmd: c.TimeOutRun) -> Applied:
        return self._update_run(cmd.run_id, lambda run: run.time_out())

    def compensate_step(self, cmd: c.CompensateStep) -> Applied:
        return self._update_run(cmd.run_id, lambda run: run.compensate_step(cmd.step))

    # ---------------------------------------------------------------------------- queries
    def get_run(self, run_id: UUID) -> WorkflowRun:
        try:
            return self._load(run_id, WorkflowRun)
        except AggregateNotFoundError:
            raise RunNotFoundError(run_id) from None

    def get_inbound_event(self, event_id: UUID) -> InboundEvent:
        try:
            return self._load(event_id, InboundEvent)
        except AggregateNotFoundError:
            raise EventNotFoundError(event_id) from None

    def get_workflow_type(self, name: str) -> WorkflowType:
        check_name("workflow", name)  # a malformed name is invalid, not merely unknown
        try:
            return self._load(workflow_type_id(name), WorkflowType)
        except AggregateNotFoundError:
            raise UnknownWorkflowError(name) from None

    # -------------------------------------------------------------------------- internals
    def _update_run(self, run_id: UUID, decide: Callable[[WorkflowRun], Any]) -> Applied:
        """Load, decide, save; on a concurrent write, reload and decide again."""

        def attempt() -> Applied:
            run = self.get_run(run_id)
            decide(run)
            return Applied(self._save(run))

        return self._retrying(attempt)

    def _retrying(self, attempt: Callable[[], R]) -> R:
        for _ in range(MAX_CONFLICT_RETRIES):
            try:
                return attempt()
            except RecordConflictError:
                continue  # another writer got there first: reload and decide again
        raise ConcurrencyConflictError(
            f"gave up after {MAX_CONFLICT_RETRIES} optimistic-concurrency conflicts"
        )

    def _load(self, aggregate_id: UUID, kind: type[A]) -> A:
        aggregate: Aggregate = self.repository.get(aggregate_id)
        if not isinstance(aggregate, kind):
            raise AggregateNotFoundError(aggregate_id)
        return aggregate

    def _exists(self, aggregate_id: UUID) -> bool:
        return aggregate_id in self.repository

    def _save(self, *aggregates: Aggregate | None) -> int:
        """Save every aggregate's pending events atomically; the last event's position."""
        recordings: list[Recording[UUID]] = self.save(*aggregates)
        if recordings:
            return recordings[-1].notification.id
        return self._head()

    def _head(self) -> int:
        return self.recorder.max_notification_id() or 0
