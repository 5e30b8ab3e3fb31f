"""WorkflowRuns: the application service that loads, decides on and saves every aggregate."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar, cast
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import ApplicationRecorder, RecordConflictError
from eventsourcing.popo import POPOApplicationRecorder
from eventsourcing.utils import Environment
from pydantic import BaseModel, ConfigDict

from domain.errors import (
    ConcurrencyConflictError,
    DomainError,
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
from services import aggregate_cache
from services import commands as c
from services.clock import Clock, SystemClock
from services.command_log import CommandLog, CommandRecord, POPOCommandRecorder
from services.snapshots import snapshot_of

A = TypeVar("A", bound=Aggregate)
T = TypeVar("T")
C = TypeVar("C", bound=c.Command)

MAX_CONFLICT_RETRIES = 8
"""Optimistic-concurrency retries before a command gives up with ``conflict``."""

TRUSTING: frozenset[type[c.Command]] = frozenset({c.StartStep, c.CompleteStep, c.CompleteRun})
"""Commands that read and change their run alone. In a small batch of nothing else (and
no ``command_id``), they are first decided on the cached runs as they are, without
asking the store for newer events: the insert's version check refuses the save if
another instance appended meanwhile, and the batch is then decided again on the store's
state. A refusal, or a decision that changes nothing, sends the batch there too, since
neither is checked by an insert. This saves a query per batch at low load, where a
step's completion and the next step's start share one (docs/performance.md,
optimisation log)."""

TRUSTING_BATCH = 8
"""At most this many commands are decided trusting the cache: a larger batch reads its
runs in one query anyway, and one refusal would decide the whole batch twice."""


# ------------------------------------------------------------------------------ replies
class Reply(BaseModel):
    """A command was applied; ``position`` is the global position of its last event.

    When the command changed nothing (a repeat), ``position`` is the store's head, which
    is at least the position of every event the command's aggregates have.
    """

    model_config = ConfigDict(frozen=True)

    position: int = 0

    def to_json(self) -> dict[str, JSON]:
        return {"ok": True, **self.model_dump(mode="json")}


class Applied(Reply):
    pass


class RunStartedReply(Reply):
    run_id: UUID
    created: bool
    run: dict[str, JSON] | None = None
    """An eager start's run, as ``load_run`` gives it, for the starter's worker (ADR 17)."""

    def to_json(self) -> dict[str, JSON]:
        body = super().to_json()
        if body.get("run") is None:
            body.pop("run", None)  # a plain start's reply stays as it was
        return body


class EventSentReply(Reply):
    event_id: UUID
    created: bool


class RunCompletedReply(Reply):
    completed_now: bool = True
    """False when the run had completed already (a repeat, or another holder's end)."""


class RunLoaded(Reply):
    """A run's state as a worker needs it to replay: memoised steps, timers, waits..."""

    run: dict[str, JSON]


Result = Reply | DomainError
"""What a command in a batch gets: its reply, or the domain error that refused it."""


# ------------------------------------------------------------------------ unit of work
class UnitOfWork:
    """The aggregates a batch of commands loads, creates and changes; saved together."""

    def __init__(self, app: WorkflowRuns, *, cached: bool = True, trusting: bool = False) -> None:
        """``cached=False`` reads the store only: for queries, whose callers keep what
        they get (the cache must never share an aggregate with anyone). ``trusting``
        takes a cached aggregate as it is, unchecked against the store (see TRUSTING)."""
        self.app = app
        self._cached = cached
        self._trusting = trusting
        self._aggregates: dict[UUID, Aggregate] = {}
        self._missing: set[UUID] = set()
        self._existing: set[UUID] = set()

    def get(self, aggregate_id: UUID, kind: type[A]) -> A:
        aggregate = self._aggregates.get(aggregate_id)
        if aggregate is None:
            if aggregate_id in self._missing:
                raise AggregateNotFoundError(aggregate_id)
            try:
                aggregate = self.app.load(
                    aggregate_id, cached=self._cached, fresh=not self._trusting
                )
            except AggregateNotFoundError:
                self._missing.add(aggregate_id)
                raise
            self._aggregates[aggregate_id] = aggregate
        if not isinstance(aggregate, kind):
            raise AggregateNotFoundError(aggregate_id)
        return aggregate

    def exists(self, aggregate_id: UUID) -> bool:
        if aggregate_id in self._aggregates or aggregate_id in self._existing:
            return True
        if aggregate_id in self._missing:
            return False
        # Aggregates are never deleted: one that is cached exists.
        return aggregate_id in self.app.cache or aggregate_id in self.app.repository

    def take_cached(self, aggregate_ids: Iterable[UUID]) -> None:
        """Take the cached ones of these aggregates at once, brought up to date together:
        one query for the whole batch instead of one per aggregate."""
        taken = {}
        for aggregate_id in aggregate_ids:
            if self._cached and aggregate_id not in self._aggregates:
                aggregate = self.app.cache.take(aggregate_id)
                if aggregate is not None:
                    taken[aggregate_id] = aggregate
        if taken:
            self._aggregates.update(self.app.catch_up(taken))

    def prefetch_existence(self, aggregate_ids: Sequence[UUID], log: CommandLog) -> None:
        """Learn in one query which of many aggregates exist (keyed starts, resent events)."""
        existing = log.select_existing(aggregate_ids)
        self._existing |= existing
        self._missing |= set(aggregate_ids) - existing

    def add(self, aggregate: Aggregate) -> None:
        self._aggregates[aggregate.id] = aggregate
        self._missing.discard(aggregate.id)

    def pending(self) -> dict[UUID, int]:
        return {i: len(a.pending_events) for i, a in self._aggregates.items()}

    def changed_since(self, before: dict[UUID, int]) -> bool:
        """Whether an aggregate has more pending events than ``before`` (one loaded since
        then and left unchanged has none)."""
        return any(n != before.get(i, 0) for i, n in self.pending().items())

    def changed(self) -> list[Aggregate]:
        return [a for a in self._aggregates.values() if a.pending_events]

    def committed(self) -> None:
        """The batch is saved: what it holds is the store's state, worth caching."""
        if self._cached:
            self.app.cache.put(self._aggregates.values())


@dataclass
class _Decided:
    """A command decided in a batch, with the (aggregate, index) of each event it made."""

    command: c.Command
    reply: Reply
    events: list[tuple[UUID, int]] = field(default_factory=list)


class _PoisonedBatchError(Exception):
    """A command failed after changing an aggregate: its neighbours must run alone."""


Handler = Callable[["WorkflowRuns", UnitOfWork, Any], Reply]
_HANDLERS: dict[type[c.Command], tuple[Handler, type[Reply]]] = {}


def handles(
    command: type[C], reply: type[Reply] = Applied
) -> Callable[[Callable[[WorkflowRuns, UnitOfWork, C], Reply]], Callable[..., Reply]]:
    """Register a decision function for a command type (and the type of its reply)."""

    def register(fn: Callable[[WorkflowRuns, UnitOfWork, C], Reply]) -> Callable[..., Reply]:
        _HANDLERS[command] = (fn, reply)
        return fn

    return register


def command_name(command: type[c.Command]) -> str:
    """``StartRun`` -> ``start_run``: the NATS subject suffix and the handler's name."""
    return "".join(f"_{ch.lower()}" if ch.isupper() else ch for ch in command.__name__)[1:]


# ------------------------------------------------------------------------ the service
class WorkflowRuns(Application[UUID]):
    """One event store (one notification log) for runs, inbound events and workflow types."""

    name = "ledgerflow"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # eventsourcing names tables after the class; a subclass must keep the same store.
        if "name" not in cls.__dict__:
            cls.name = WorkflowRuns.name
        super().__init_subclass__(**kwargs)

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        clock: Clock | None = None,
        rand: Callable[[], float] = random.random,
        cache_size: int = aggregate_cache.DEFAULT_SIZE,
    ) -> None:
        super().__init__(env=env)
        self.clock = clock or SystemClock()
        self.rand = rand
        self.cache = aggregate_cache.AggregateCache(cache_size)
        self.events_appended = 0  # by this instance, for metrics

    def construct_env(self, name: str, env: Mapping[str, str] | None = None) -> Environment:
        """Configuration comes only from the settings the composition root passes in.

        eventsourcing would otherwise read ``os.environ`` too; the composition root
        (infrastructure.bootstrap) is the one place that does.
        """
        return Environment(name, {**type(self).env, **(env or {})})

    def load(self, aggregate_id: UUID, *, cached: bool = True, fresh: bool = True) -> Aggregate:
        """An aggregate at its latest stored version, for the caller alone to change.

        A cached one is brought up to date with the events stored after its version (by
        another instance, say), so a decision never rests on stale state; unless
        ``fresh`` is False, for a decision whose save checks it (TRUSTING).
        """
        cached_one = self.cache.take(aggregate_id) if cached else None
        if cached_one is None:
            loaded: Aggregate = self.repository.get(
                aggregate_id, projector_func=aggregate_cache.project
            )
            return loaded
        if not fresh:
            return cached_one
        return self.catch_up({aggregate_id: cached_one})[aggregate_id]

    def catch_up(self, aggregates: Mapping[UUID, Aggregate]) -> dict[UUID, Aggregate]:
        """Cached aggregates with the events stored after their versions applied."""
        recorder = self.recorder
        if len(aggregates) > 1 and isinstance(recorder, aggregate_cache.EventsAfter):
            newer: dict[UUID, list[Any]] = {}
            stored = recorder.select_events_after([(i, a.version) for i, a in aggregates.items()])
            for event in map(self.mapper.to_domain_event, stored):
                newer.setdefault(event.originator_id, []).append(event)
        else:
            newer = {i: list(self.events.get(i, gt=a.version)) for i, a in aggregates.items()}
        caught_up: dict[UUID, Aggregate] = {}
        for aggregate_id, aggregate in aggregates.items():
            current = aggregate_cache.project(aggregate, newer.get(aggregate_id, ()))
            assert current is not None
            caught_up[aggregate_id] = current
        return caught_up

    def construct_recorder(self) -> ApplicationRecorder:
        recorder = super().construct_recorder()
        if type(recorder) is POPOApplicationRecorder:
            return POPOCommandRecorder()  # in memory too, commands are logged with events
        return recorder

    # ------------------------------------------------------------------- execution
    def handle(self, command: c.Command) -> Reply:
        """Apply one command; a refusal raises its DomainError."""
        result = self.execute([command])[0]
        if isinstance(result, DomainError):
            raise result
        return result

    def execute(self, commands: Sequence[c.Command]) -> list[Result]:
        """Apply many commands in one transaction (group commit), each isolated.

        A command's domain error refuses that command only. A repeated ``command_id``
        gets the first reply and changes nothing. When another writer changed the same
        aggregates first, the whole batch is decided again on fresh state.
        """
        if _trustable(commands):
            trusted = self._execute_trusting(commands)
            if trusted is not None:
                return trusted
        for _ in range(MAX_CONFLICT_RETRIES):
            try:
                return self._execute_once(commands)
            except RecordConflictError:
                continue  # another writer got there first: reload and decide again
            except _PoisonedBatchError:
                return [r for command in commands for r in self.execute([command])]
        if len(commands) > 1:
            return [r for command in commands for r in self.execute([command])]
        message = f"gave up after {MAX_CONFLICT_RETRIES} optimistic-concurrency conflicts"
        return [ConcurrencyConflictError(message)]

    def _execute_once(self, commands: Sequence[c.Command]) -> list[Result]:
        uow = UnitOfWork(self)
        if len(commands) > 1:
            uow.take_cached(_targets(commands))
        if len(commands) > 1 and isinstance(self.recorder, CommandLog):
            uow.prefetch_existence(_deterministic_ids(commands), self.recorder)
        first_replies = self._first_replies(commands)
        outcomes: list[_Decided | Result | int] = []
        first_index: dict[str, int] = {}
        for command in commands:
            command_id = command.command_id
            if command_id is not None and command_id in first_replies:
                reply_type = _HANDLERS[type(command)][1]
                outcomes.append(reply_type.model_validate(first_replies[command_id]))
                continue
            if command_id is not None and command_id in first_index:
                outcomes.append(first_index[command_id])  # same reply as that one
                continue
            before = uow.pending()
            try:
                reply = self._decide(uow, command)
            except DomainError as error:
                if uow.changed_since(before):
                    if len(commands) == 1:
                        return [error]  # nothing is saved
                    raise _PoisonedBatchError from error
                outcomes.append(error)
                continue
            if command_id is not None:
                first_index[command_id] = len(outcomes)
            outcomes.append(_Decided(command, reply, _new_events(uow, before)))
        return self._commit(uow, outcomes)

    def _execute_trusting(self, commands: Sequence[c.Command]) -> list[Result] | None:
        """``commands`` decided on their cached runs as they are (TRUSTING); None when they
        must be decided again on the store's state: one refused or unchanged, or the save
        too late."""
        uow = UnitOfWork(self, trusting=True)
        decided: list[_Decided | Result | int] = []
        for command in commands:
            before = uow.pending()
            try:
                reply = self._decide(uow, command)
            except DomainError:
                break
            if not uow.changed_since(before):
                break
            decided.append(_Decided(command, reply, _new_events(uow, before)))
        else:
            try:
                return self._commit(uow, decided)
            except RecordConflictError:
                return None  # another instance appended first: the store decides below
        if not uow.changed():
            uow.committed()  # unchanged: back in the cache as they were
        return None

    def _commit(self, uow: UnitOfWork, outcomes: list[_Decided | Result | int]) -> list[Result]:
        changed = uow.changed()
        offsets: dict[UUID, int] = {}
        total = 0
        for aggregate in changed:
            offsets[aggregate.id] = total
            total += len(aggregate.pending_events)
        last_event = {
            i: max(offsets[agg] + n for agg, n in o.events)
            for i, o in enumerate(outcomes)
            if isinstance(o, _Decided) and o.events
        }
        log: list[CommandRecord] = []
        for i, index in last_event.items():
            decided = outcomes[i]
            assert isinstance(decided, _Decided)
            if decided.command.command_id is not None:
                name = command_name(type(decided.command))
                reply = _repeated(decided.reply).to_json()  # what a repeat will get
                log.append(CommandRecord(decided.command.command_id, name, reply, index))
        positions = (
            [r.notification.id for r in self.save(*changed, commands=log)] if changed else []
        )
        self.events_appended += len(positions)
        uow.committed()
        head = positions[-1] if positions else self._head()
        results: list[Result] = []
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, _Decided):
                position = positions[last_event[i]] if i in last_event else head
                results.append(outcome.reply.model_copy(update={"position": position}))
            elif isinstance(outcome, int):  # a repeat of a command_id in this batch
                results.append(_repeated(results[outcome]))
            else:
                results.append(outcome)
        return results

    def _first_replies(self, commands: Sequence[c.Command]) -> dict[str, dict[str, JSON]]:
        ids = [command.command_id for command in commands if command.command_id is not None]
        if not ids or not isinstance(self.recorder, CommandLog):
            return {}
        return self.recorder.select_command_replies(ids)

    def _decide(self, uow: UnitOfWork, command: c.Command) -> Reply:
        try:
            handler, _ = _HANDLERS[type(command)]
        except KeyError:
            raise TypeError(f"no handler for {type(command).__name__}") from None
        return handler(self, uow, command)

    # ------------------------------------------------ one typed method per command
    def start_run(self, cmd: c.StartRun) -> RunStartedReply:
        return _typed(self.handle(cmd), RunStartedReply)

    def send_event(self, cmd: c.SendEvent) -> EventSentReply:
        return _typed(self.handle(cmd), EventSentReply)

    def emit_event(self, cmd: c.EmitEvent) -> EventSentReply:
        return _typed(self.handle(cmd), EventSentReply)

    def trigger_run(self, cmd: c.TriggerRun) -> RunStartedReply:
        return _typed(self.handle(cmd), RunStartedReply)

    def cancel_run(self, cmd: c.CancelRun) -> Reply:
        return self.handle(cmd)

    def retry_run(self, cmd: c.RetryRun) -> Reply:
        return self.handle(cmd)

    def register_workflow(self, cmd: c.RegisterWorkflow) -> Reply:
        return self.handle(cmd)

    def start_step(self, cmd: c.StartStep) -> Reply:
        return self.handle(cmd)

    def complete_step(self, cmd: c.CompleteStep) -> Reply:
        return self.handle(cmd)

    def fail_step(self, cmd: c.FailStep) -> Reply:
        return self.handle(cmd)

    def start_sleep(self, cmd: c.StartSleep) -> Reply:
        return self.handle(cmd)

    def fire_timer(self, cmd: c.FireTimer) -> Reply:
        return self.handle(cmd)

    def start_wait(self, cmd: c.StartWait) -> Reply:
        return self.handle(cmd)

    def deliver_event(self, cmd: c.DeliverEvent) -> Reply:
        return self.handle(cmd)

    def time_out_wait(self, cmd: c.TimeOutWait) -> Reply:
        return self.handle(cmd)

    def start_child(self, cmd: c.StartChild) -> Reply:
        return self.handle(cmd)

    def resolve_child(self, cmd: c.ResolveChild) -> Reply:
        return self.handle(cmd)

    def complete_run(self, cmd: c.CompleteRun) -> Reply:
        return self.handle(cmd)

    def fail_run(self, cmd: c.FailRun) -> Reply:
        return self.handle(cmd)

    def time_out_run(self, cmd: c.TimeOutRun) -> Reply:
        return self.handle(cmd)

    def compensate_step(self, cmd: c.CompensateStep) -> Reply:
        return self.handle(cmd)

    # ---------------------------------------------------------------------- queries
    def get_run(self, run_id: UUID) -> WorkflowRun:
        return _run(UnitOfWork(self, cached=False), run_id)

    def get_inbound_event(self, event_id: UUID) -> InboundEvent:
        return _inbound_event(UnitOfWork(self, cached=False), event_id)

    def get_workflow_type(self, name: str) -> WorkflowType:
        return _workflow_type(UnitOfWork(self, cached=False), name)

    def _head(self) -> int:
        return self.recorder.max_notification_id() or 0


# -------------------------------------------------------------------- the decisions
@handles(c.StartRun, RunStartedReply)
def _start_run(app: WorkflowRuns, uow: UnitOfWork, cmd: c.StartRun) -> Reply:
    workflow = _workflow_type(uow, cmd.workflow)
    run_id = run_id_for(cmd.workflow, cmd.key)
    if cmd.key is not None and uow.exists(run_id):
        return RunStartedReply(run_id=run_id, created=False)
    run = workflow.new_run(run_id, cmd.input, key=cmd.key, eager=cmd.eager)
    if not run.held_eagerly:
        uow.add(run)
        return RunStartedReply(run_id=run_id, created=True)
    if cmd.first_step is not None:  # before it is added: a refused step starts nothing
        first = cmd.first_step
        run.start_step(first.step, 1, first.retry_policy, dispatch=run.dispatches)
    uow.add(run)
    return RunStartedReply(run_id=run_id, created=True, run=snapshot_of(run))


@handles(c.SendEvent, EventSentReply)
def _send_event(app: WorkflowRuns, uow: UnitOfWork, cmd: c.SendEvent) -> Reply:
    event_id = inbound_event_id(cmd.id)
    if cmd.id is not None and uow.exists(event_id):
        return EventSentReply(event_id=event_id, created=False)
    uow.add(InboundEvent.receive(event_id, cmd.name, cmd.data, external_id=cmd.id))
    return EventSentReply(event_id=event_id, created=True)


@handles(c.TriggerRun, RunStartedReply)
def _trigger_run(app: WorkflowRuns, uow: UnitOfWork, cmd: c.TriggerRun) -> Reply:
    """Start the run an inbound event triggers and record it on the event, in one
    transaction; the run's id and key are fixed by (event, workflow), its input is the
    event's data."""
    workflow = _workflow_type(uow, cmd.workflow)
    inbound = _inbound_event(uow, cmd.event_id)
    key = f"event:{inbound.id}"
    run_id = run_id_for(workflow.name, key)
    created = not uow.exists(run_id)
    if created:
        uow.add(workflow.new_run(run_id, inbound.data, key=key, triggered_by=inbound.id))
    inbound.record_triggered_run(workflow.name, run_id)
    return RunStartedReply(run_id=run_id, created=created)


@handles(c.CancelRun)
def _cancel_run(app: WorkflowRuns, uow: UnitOfWork, cmd: c.CancelRun) -> Reply:
    _run(uow, cmd.run_id).request_cancel(cmd.reason)
    return Applied()


@handles(c.RetryRun)
def _retry_run(app: WorkflowRuns, uow: UnitOfWork, cmd: c.RetryRun) -> Reply:
    _run(uow, cmd.run_id).retry()
    return Applied()


@handles(c.RegisterWorkflow)
def _register_workflow(app: WorkflowRuns, uow: UnitOfWork, cmd: c.RegisterWorkflow) -> Reply:
    type_id = workflow_type_id(check_name("workflow", cmd.name))
    definition = WorkflowType.definition_of(
        cmd.triggers, cmd.retry_policy, cmd.timeouts, cmd.concurrency, cmd.queue
    )
    try:
        workflow = uow.get(type_id, WorkflowType)
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
        uow.add(workflow)
    else:
        workflow.redefine(definition)
    if cmd.worker_id is not None:
        workflow.add_worker(cmd.worker_id)
    return Applied()


@handles(c.StartStep)
def _start_step(app: WorkflowRuns, uow: UnitOfWork, cmd: c.StartStep) -> Reply:
    _run(uow, cmd.run_id).start_step(cmd.step, cmd.attempt, cmd.retry_policy, cmd.dispatch)
    return Applied()


@handles(c.DispatchRun)
def _dispatch_run(app: WorkflowRuns, uow: UnitOfWork, cmd: c.DispatchRun) -> Reply:
    run = _run(uow, cmd.run_id)
    queue = str(_workflow_type(uow, run.workflow).definition["queue"])
    run.dispatch(cmd.reason, cmd.cause, queue)
    return Applied()


@handles(c.LoadRun, RunLoaded)
def _load_run(app: WorkflowRuns, uow: UnitOfWork, cmd: c.LoadRun) -> Reply:
    return RunLoaded(run=snapshot_of(_run(uow, cmd.run_id)))


@handles(c.CompleteStep)
def _complete_step(app: WorkflowRuns, uow: UnitOfWork, cmd: c.CompleteStep) -> Reply:
    _run(uow, cmd.run_id).complete_step(cmd.step, cmd.attempt, cmd.output, cmd.compensable)
    return Applied()


@handles(c.FailStep)
def _fail_step(app: WorkflowRuns, uow: UnitOfWork, cmd: c.FailStep) -> Reply:
    _run(uow, cmd.run_id).fail_step(
        cmd.step,
        cmd.attempt,
        cmd.error.model_dump(),
        now=app.clock.now(),
        retryable=cmd.retryable,
        rand=app.rand(),
    )
    return Applied()


@handles(c.StartSleep)
def _start_sleep(app: WorkflowRuns, uow: UnitOfWork, cmd: c.StartSleep) -> Reply:
    wake_at = cmd.until or app.clock.now() + timedelta(seconds=cmd.seconds or 0)
    _run(uow, cmd.run_id).start_sleep(cmd.name, wake_at)
    return Applied()


@handles(c.FireTimer)
def _fire_timer(app: WorkflowRuns, uow: UnitOfWork, cmd: c.FireTimer) -> Reply:
    _run(uow, cmd.run_id).fire_timer(cmd.name)
    return Applied()


@handles(c.StartWait)
def _start_wait(app: WorkflowRuns, uow: UnitOfWork, cmd: c.StartWait) -> Reply:
    timeout_at = None
    if cmd.timeout_seconds is not None:
        timeout_at = app.clock.now() + timedelta(seconds=cmd.timeout_seconds)
    _run(uow, cmd.run_id).start_wait(cmd.name, cmd.event_name, cmd.match, timeout_at)
    return Applied()


@handles(c.DeliverEvent)
def _deliver_event(app: WorkflowRuns, uow: UnitOfWork, cmd: c.DeliverEvent) -> Reply:
    """Wake a waiting run and record on the event that it woke it, in one transaction."""
    run = _run(uow, cmd.run_id)
    inbound = _inbound_event(uow, cmd.event_id)
    run.receive_event(cmd.name, inbound.id, inbound.name, inbound.data)
    if run.waits[cmd.name].event_id == inbound.id:
        inbound.record_woken_run(run.id, cmd.name)
    return Applied()


@handles(c.TimeOutWait)
def _time_out_wait(app: WorkflowRuns, uow: UnitOfWork, cmd: c.TimeOutWait) -> Reply:
    _run(uow, cmd.run_id).time_out_wait(cmd.name)
    return Applied()


@handles(c.StartChild)
def _start_child(app: WorkflowRuns, uow: UnitOfWork, cmd: c.StartChild) -> Reply:
    """Start a child run and record it on its parent, in one transaction."""
    workflow = _workflow_type(uow, cmd.workflow)
    parent = _run(uow, cmd.run_id)
    child_id = child_run_id(parent.id, cmd.name)
    parent.start_child(cmd.name, child_id, cmd.workflow)
    if not uow.exists(child_id):
        uow.add(
            workflow.new_run(child_id, cmd.input, parent_run_id=parent.id, parent_step=cmd.name)
        )
    return Applied()


@handles(c.ResolveChild)
def _resolve_child(app: WorkflowRuns, uow: UnitOfWork, cmd: c.ResolveChild) -> Reply:
    """Resume a parent with the outcome of its ended child."""
    parent = _run(uow, cmd.run_id)
    state = parent.children.get(cmd.name)
    if state is None or state.outcome != "pending":
        parent.complete_child(cmd.name)  # raises, or is a no-op
        return Applied()
    child = _run(uow, state.run_id)
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
    return Applied()


@handles(c.EmitEvent, EventSentReply)
def _emit_event(app: WorkflowRuns, uow: UnitOfWork, cmd: c.EmitEvent) -> Reply:
    """Record a run's sent event and the inbound event itself, in one transaction."""
    run = _run(uow, cmd.run_id)
    event_id = run.send_event(cmd.name, cmd.event_name, cmd.data)
    created = not uow.exists(event_id)
    if created:
        uow.add(InboundEvent.receive(event_id, cmd.event_name, cmd.data, sent_by_run=run.id))
    return EventSentReply(event_id=event_id, created=created)


@handles(c.CompleteRun, RunCompletedReply)
def _complete_run(app: WorkflowRuns, uow: UnitOfWork, cmd: c.CompleteRun) -> Reply:
    run = _run(uow, cmd.run_id)
    completed_before = run.status is RunStatus.COMPLETED
    run.complete(cmd.output, cmd.after_steps)
    return RunCompletedReply(completed_now=not completed_before)


@handles(c.FailRun)
def _fail_run(app: WorkflowRuns, uow: UnitOfWork, cmd: c.FailRun) -> Reply:
    _run(uow, cmd.run_id).fail(cmd.error.model_dump())
    return Applied()


@handles(c.TimeOutRun)
def _time_out_run(app: WorkflowRuns, uow: UnitOfWork, cmd: c.TimeOutRun) -> Reply:
    _run(uow, cmd.run_id).time_out()
    return Applied()


@handles(c.CompensateStep)
def _compensate_step(app: WorkflowRuns, uow: UnitOfWork, cmd: c.CompensateStep) -> Reply:
    _run(uow, cmd.run_id).compensate_step(cmd.step)
    return Applied()


COMMANDS: dict[str, type[c.Command]] = {command_name(t): t for t in _HANDLERS}
"""Every command by its wire name (``start_run``, ...): the NATS/HTTP command vocabulary."""


# ---------------------------------------------------------------------------- loading
def _run(uow: UnitOfWork, run_id: UUID) -> WorkflowRun:
    try:
        return uow.get(run_id, WorkflowRun)
    except AggregateNotFoundError:
        raise RunNotFoundError(run_id) from None


def _inbound_event(uow: UnitOfWork, event_id: UUID) -> InboundEvent:
    try:
        return uow.get(event_id, InboundEvent)
    except AggregateNotFoundError:
        raise EventNotFoundError(event_id) from None


def _workflow_type(uow: UnitOfWork, name: str) -> WorkflowType:
    check_name("workflow", name)  # a malformed name is invalid, not merely unknown
    try:
        return uow.get(workflow_type_id(name), WorkflowType)
    except AggregateNotFoundError:
        raise UnknownWorkflowError(name) from None


def _targets(commands: Sequence[c.Command]) -> list[UUID]:
    """The aggregates a batch will certainly load: runs, and started workflows' types."""
    ids = {m.run_id: None for m in commands if isinstance(m, c.RunCommand)}
    for m in commands:
        if isinstance(m, c.StartRun | c.TriggerRun | c.StartChild):
            ids[workflow_type_id(m.workflow)] = None
    return list(ids)


def _deterministic_ids(commands: Sequence[c.Command]) -> list[UUID]:
    """The ids that keyed starts and identified events will land on."""
    ids = [run_id_for(m.workflow, m.key) for m in commands if isinstance(m, c.StartRun) and m.key]
    ids += [inbound_event_id(m.id) for m in commands if isinstance(m, c.SendEvent) and m.id]
    return ids


def _trustable(commands: Sequence[c.Command]) -> bool:
    return len(commands) <= TRUSTING_BATCH and all(
        type(command) in TRUSTING and not command.command_id for command in commands
    )


def _new_events(uow: UnitOfWork, before: dict[UUID, int]) -> list[tuple[UUID, int]]:
    """The (aggregate id, pending index) of every event appended since ``before``."""
    return [
        (aggregate_id, index)
        for aggregate_id, count in uow.pending().items()
        for index in range(before.get(aggregate_id, 0), count)
    ]


def _repeated(result: T) -> T:
    """A repeated command's reply: the first one, never handing an eager run out again,
    since a second holder would run it beside the first under the same hand-off (ADR 17).
    The command log keeps this reply, and a repeat in the same batch gets it too."""
    if isinstance(result, RunStartedReply) and result.run is not None:
        return cast(T, result.model_copy(update={"run": None}))
    return result


R = TypeVar("R", bound=Reply)


def _typed(reply: Reply, kind: type[R]) -> R:
    assert isinstance(reply, kind), reply
    return reply
