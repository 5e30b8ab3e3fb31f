"""The Scheduler process manager: from each event, the commands to send and the rows to keep."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Protocol
from uuid import UUID

from domain.values import JSON
from domain.workflow_run import EAGER, EAGER_EXPIRED, matches
from projections.records import EventRecord
from services import commands as c

TimerKind = Literal["sleep", "retry", "wait", "run"]
SlotState = Literal["held", "queued", "ended"]

DISPATCH_REASONS: dict[str, str] = {
    "WorkflowRun.RunStarted": "start",
    "WorkflowRun.TimerFired": "timer",
    "WorkflowRun.EventReceived": "event",
    "WorkflowRun.WaitTimedOut": "wait_timeout",
    "WorkflowRun.ChildCompleted": "child",
    "WorkflowRun.RunRetried": "retried",
    "WorkflowRun.CompensationStarted": "compensate",
}
"""The events that make a run movable, and the reason its hand-off gives."""

RETRYABLE_ENDS = frozenset({"WorkflowRun.RunFailed", "WorkflowRun.RunTimedOut"})
"""Ends after which an operator may retry the run."""

GATED = frozenset({"WorkflowRun.RunStarted", "WorkflowRun.RunRetried"})
"""Hand-offs a concurrency limit may hold back (their handlers decide the dispatch)."""

RELEASED = "released"
"""The reason of a held-back run's hand-off when a slot frees."""

EAGER_LEASE = timedelta(seconds=30)
"""How long an eagerly started run is left to its starter's worker before the scheduler
asks whether that worker still holds it (ADR 17); asked again every lease after that."""
LEASE_GRACE = timedelta(seconds=10)
"""After a holder did not answer, how long before the scheduler asks once more and, with
no answer again, hands the run to the queue: longer than a NATS client takes to
reconnect, so a network blip does not take a run from a worker that still runs it."""

SUSPENDS = frozenset(
    {
        "WorkflowRun.SleepStarted",
        "WorkflowRun.RetryScheduled",
        "WorkflowRun.WaitStarted",
        "WorkflowRun.ChildStarted",
    }
)
"""Events after which a run waits for the scheduler: an eager run's worker let go of it,
and its lease has nothing more to watch (the scheduler dispatches it when it may go on)."""

RUN_ENDS = frozenset(
    {
        "WorkflowRun.RunCompleted",
        "WorkflowRun.RunFailed",
        "WorkflowRun.RunCancelled",
        "WorkflowRun.RunTimedOut",
    }
)


@dataclass(frozen=True)
class Timer:
    """A row of the timers table: at ``due_at``, the poller sends ``command()``."""

    run_id: UUID
    kind: TimerKind
    name: str
    due_at: datetime
    cause: int = 0  # a retry's: the position of its RetryScheduled

    def command(self) -> c.Command:
        if self.kind == "sleep":
            return c.FireTimer(run_id=self.run_id, name=self.name)
        if self.kind == "retry":
            return c.DispatchRun(run_id=self.run_id, reason="retry", cause=self.cause)
        if self.kind == "wait":
            return c.TimeOutWait(run_id=self.run_id, name=self.name)
        return c.TimeOutRun(run_id=self.run_id)


@dataclass(frozen=True)
class Lease:
    """An eagerly started run left to its starter's worker until ``due_at`` (ADR 17), a
    row of its own table (a scheduler older than the lease never sees it). ``cause`` is
    the position of the eager hand-off. ``suspect``: the holder did not answer once."""

    run_id: UUID
    due_at: datetime
    cause: int
    suspect: bool = False

    def command(self) -> c.Command:
        return c.DispatchRun(run_id=self.run_id, reason=EAGER_EXPIRED, cause=self.cause)

    def after(
        self,
        held: bool | None,
        now: datetime,
        eager_lease: timedelta = EAGER_LEASE,
        grace: timedelta = LEASE_GRACE,
    ) -> Lease | c.Command:
        """What a due lease becomes once its holder was asked: renewed when it answered
        (``held``), unchanged when it could not be asked (None), suspect when it did not
        answer, and its hand-off to the queue when it did not answer twice."""
        if held is None:
            return self
        if held:
            return Lease(self.run_id, now + eager_lease, self.cause)
        if not self.suspect:
            return Lease(self.run_id, now + grace, self.cause, suspect=True)
        return self.command()


@dataclass(frozen=True)
class Wait:
    """An open wait of a run, as the router matches inbound events against it."""

    run_id: UUID
    name: str
    event_name: str
    match: dict[str, JSON]


@dataclass(frozen=True)
class Parent:
    run_id: UUID
    step: str


@dataclass(frozen=True)
class Limit:
    """A workflow's concurrency limit: at most ``limit`` slots per value of input ``key``."""

    limit: int
    key: str | None = None

    @classmethod
    def of(cls, definition: JSON) -> Limit | None:
        """The limit a workflow definition sets (None: unlimited, or unreadable)."""
        policy = definition.get("concurrency") if isinstance(definition, dict) else None
        if not isinstance(policy, dict):
            return None
        limit, key = policy.get("limit"), policy.get("key")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            return None
        return cls(limit, key if isinstance(key, str) and key else None)

    def group(self, data: dict[str, JSON]) -> str:
        """The slot group of a run started with ``data``: the JSON of its key field's value
        (a missing field, a non-object input or no key at all: ``null``)."""
        if self.key is None:
            return "null"
        run_input = data.get("input")
        value = run_input.get(self.key) if isinstance(run_input, dict) else None
        return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Slot:
    """A run of a limited workflow: holding a slot, queued for one since position ``since``,
    or ended (kept while a failed run may be retried)."""

    run_id: UUID
    workflow: str
    group: str
    state: SlotState
    since: int


class SchedulerView(Protocol):
    """The scheduler's tables: written and read inside the transaction of one batch."""

    def put_timer(self, timer: Timer) -> None: ...

    def delete_timer(self, run_id: UUID, kind: TimerKind, name: str) -> None: ...

    def put_lease(self, lease: Lease) -> None: ...

    def delete_lease(self, run_id: UUID) -> None: ...

    def put_wait(self, wait: Wait) -> None: ...

    def delete_wait(self, run_id: UUID, name: str) -> None: ...

    def open_waits(self, event_name: str) -> list[Wait]: ...

    def put_parent(self, run_id: UUID, parent: Parent) -> None: ...

    def parent_of(self, run_id: UUID) -> Parent | None: ...

    def end_run(self, run_id: UUID) -> None:
        """Forget every timer, lease, wait and parent link of an ended run."""
        ...

    def put_triggers(self, type_id: UUID, workflow: str | None, triggers: Iterable[str]) -> None:
        """Replace the event names that start a run of the workflow ``type_id`` (named
        ``workflow``; None keeps the name it was registered with)."""
        ...

    def triggered_workflows(self, event_name: str) -> list[str]: ...

    def put_limit(self, type_id: UUID, workflow: str | None, limit: Limit | None) -> str | None:
        """Set the concurrency limit of the workflow ``type_id`` (named ``workflow``; None
        keeps the name it was registered with); the workflow's name, if known."""
        ...

    def limit_of(self, workflow: str) -> Limit | None: ...

    def slot_of(self, run_id: UUID) -> Slot | None: ...

    def put_slot(self, slot: Slot) -> None: ...

    def delete_slot(self, run_id: UUID) -> None: ...

    def held(self, workflow: str, group: str) -> int:
        """How many runs of ``workflow`` in ``group`` hold a slot."""
        ...

    def queued(self, workflow: str, group: str | None, limit: int) -> list[Slot]:
        """The oldest ``limit`` queued runs of ``workflow`` (in ``group``, or any), by
        ``since`` then run id."""
        ...


Handler = Callable[["Scheduler", EventRecord], list[c.Command]]
_HANDLERS: dict[str, Handler] = {}


def _on(*qualified_types: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for qualified_type in qualified_types:
            _HANDLERS[qualified_type] = fn
        return fn

    return register


class Scheduler:
    """Decides, for each record in log order, the commands to send and the view's changes.

    Deterministic given the view: exactly-once comes from the caller tracking the position
    in the same transaction as the view, and every command it sends is idempotent.
    """

    def __init__(self, view: SchedulerView, eager_lease: timedelta = EAGER_LEASE) -> None:
        self.view = view
        self.eager_lease = eager_lease

    def process(self, record: EventRecord) -> list[c.Command]:
        commands: list[c.Command] = []
        handler = _HANDLERS.get(record.qualified_type)
        if handler is not None:
            commands += handler(self, record)
        if record.qualified_type in SUSPENDS:
            self.view.delete_lease(record.originator_id)
        reason = DISPATCH_REASONS.get(record.qualified_type)
        if reason is not None and record.qualified_type not in GATED:
            commands.append(
                c.DispatchRun(run_id=record.originator_id, reason=reason, cause=record.position)
            )
        return commands

    # ---------------------------------------------------------------------- timers
    @_on("WorkflowRun.RunStarted")
    def _run_started(self, record: EventRecord) -> list[c.Command]:
        data = record.data
        parent_run_id, parent_step = data.get("parent_run_id"), data.get("parent_step")
        if parent_run_id is not None and parent_step is not None:
            self.view.put_parent(
                record.originator_id, Parent(UUID(str(parent_run_id)), str(parent_step))
            )
        timeouts = data.get("timeouts")
        limit = timeouts.get("run") if isinstance(timeouts, dict) else None
        if isinstance(limit, int | float) and not isinstance(limit, bool):
            due_at = record.timestamp + timedelta(seconds=limit)
            self.view.put_timer(Timer(record.originator_id, "run", "", due_at))
        dispatch = c.DispatchRun(run_id=record.originator_id, reason="start", cause=record.position)
        workflow = data.get("workflow")
        limit = self.view.limit_of(str(workflow)) if workflow is not None else None
        if data.get("dispatched") is True:
            # Handed off in its start's transaction (ADR 13): its workflow had no limit
            # then. One set since (not seen here yet) counts the run as holding a slot.
            if limit is not None and self.view.slot_of(record.originator_id) is None:
                group = limit.group(data)
                self.view.put_slot(
                    Slot(record.originator_id, str(workflow), group, "held", record.position)
                )
            return []
        if limit is None:
            return [dispatch]
        known = self.view.slot_of(record.originator_id)
        if known is not None:  # a redelivered start: decided already
            return [dispatch] if known.state == "held" else []
        slot = Slot(record.originator_id, str(workflow), limit.group(data), "held", record.position)
        return self._take(slot, limit, dispatch)

    @_on("WorkflowRun.RunRetried")
    def _run_retried(self, record: EventRecord) -> list[c.Command]:
        dispatch = c.DispatchRun(
            run_id=record.originator_id, reason="retried", cause=record.position
        )
        slot = self.view.slot_of(record.originator_id)
        if slot is None:  # not a run of a limited workflow
            return [dispatch]
        if slot.state != "ended":  # a redelivered retry: decided already
            return [dispatch] if slot.state == "held" else []
        limit = self.view.limit_of(slot.workflow)
        if limit is None:
            self.view.delete_slot(slot.run_id)
            return [dispatch]
        return self._take(
            Slot(slot.run_id, slot.workflow, slot.group, "held", record.position), limit, dispatch
        )

    def _take(self, slot: Slot, limit: Limit, dispatch: c.DispatchRun) -> list[c.Command]:
        """Hold a slot and dispatch, or queue for one (the run stays ``queued``)."""
        if self.view.held(slot.workflow, slot.group) < limit.limit:
            self.view.put_slot(slot)
            return [dispatch]
        self.view.put_slot(Slot(slot.run_id, slot.workflow, slot.group, "queued", slot.since))
        return []

    def _release(self, workflow: str, group: str | None, cause: int) -> list[c.Command]:
        """Dispatch the oldest queued runs of ``workflow`` (in ``group``, or every group)
        while slots are free, because of the event at position ``cause``."""
        limit = self.view.limit_of(workflow)
        commands: list[c.Command] = []
        if group is None or limit is None:
            waiting = self.view.queued(workflow, group, 1 << 30)
            groups = sorted({slot.group for slot in waiting})
        else:
            groups = [group]
        for each in groups:
            free = 1 << 30 if limit is None else limit.limit - self.view.held(workflow, each)
            if free <= 0:
                continue
            for slot in self.view.queued(workflow, each, free):
                held = Slot(slot.run_id, slot.workflow, slot.group, "held", slot.since)
                if limit is None:
                    self.view.delete_slot(slot.run_id)
                else:
                    self.view.put_slot(held)
                commands.append(c.DispatchRun(run_id=slot.run_id, reason=RELEASED, cause=cause))
        return commands

    @_on("WorkflowRun.SleepStarted")
    def _sleep_started(self, record: EventRecord) -> list[c.Command]:
        due_at = _when(record.data["wake_at"])
        self.view.put_timer(Timer(record.originator_id, "sleep", _text(record, "name"), due_at))
        return []

    @_on("WorkflowRun.TimerFired")
    def _timer_fired(self, record: EventRecord) -> list[c.Command]:
        self.view.delete_timer(record.originator_id, "sleep", _text(record, "name"))
        return []

    @_on("WorkflowRun.RetryScheduled")
    def _retry_scheduled(self, record: EventRecord) -> list[c.Command]:
        due_at = _when(record.data["due_at"])
        step = _text(record, "step")
        self.view.put_timer(Timer(record.originator_id, "retry", step, due_at, record.position))
        return []

    @_on("WorkflowRun.TaskDispatched")
    def _task_dispatched(self, record: EventRecord) -> list[c.Command]:
        """An eager start is leased to its starter's worker: when the lease runs out and
        that worker no longer holds the run, the run goes to its queue (ADR 17)."""
        reason = record.data.get("reason")
        if reason == EAGER:
            due_at = record.timestamp + self.eager_lease
            self.view.put_lease(Lease(record.originator_id, due_at, record.position))
        elif reason == EAGER_EXPIRED:  # the worker gave the run back: the queue has it
            self.view.delete_lease(record.originator_id)
        return []

    @_on("WorkflowRun.StepStarted")
    def _step_started(self, record: EventRecord) -> list[c.Command]:
        self.view.delete_timer(record.originator_id, "retry", _text(record, "step"))
        return []

    # ----------------------------------------------------------------------- waits
    @_on("WorkflowRun.WaitStarted")
    def _wait_started(self, record: EventRecord) -> list[c.Command]:
        name = _text(record, "name")
        match = record.data.get("match")
        wait = Wait(
            record.originator_id,
            name,
            _text(record, "event_name"),
            dict(match) if isinstance(match, dict) else {},
        )
        self.view.put_wait(wait)
        timeout_at = record.data.get("timeout_at")
        if timeout_at is not None:
            self.view.put_timer(Timer(record.originator_id, "wait", name, _when(timeout_at)))
        return []

    @_on("WorkflowRun.EventReceived", "WorkflowRun.WaitTimedOut")
    def _wait_settled(self, record: EventRecord) -> list[c.Command]:
        name = _text(record, "name")
        self.view.delete_wait(record.originator_id, name)
        self.view.delete_timer(record.originator_id, "wait", name)
        return []

    # ------------------------------------------------------------------- run ends
    @_on(*RUN_ENDS)
    def _run_ended(self, record: EventRecord) -> list[c.Command]:
        parent = self.view.parent_of(record.originator_id)
        self.view.end_run(record.originator_id)
        commands: list[c.Command] = []
        if parent is not None:
            commands.append(c.ResolveChild(run_id=parent.run_id, name=parent.step))
        slot = self.view.slot_of(record.originator_id)
        if slot is None or slot.state == "ended":  # unlimited, or released already
            return commands
        if record.qualified_type in RETRYABLE_ENDS:  # kept: a retry takes a slot again
            self.view.put_slot(Slot(slot.run_id, slot.workflow, slot.group, "ended", slot.since))
        else:
            self.view.delete_slot(slot.run_id)
        if slot.state == "held":
            commands += self._release(slot.workflow, slot.group, record.position)
        return commands

    # --------------------------------------------------------------------- router
    @_on("WorkflowType.Registered", "WorkflowType.DefinitionChanged")
    def _definition(self, record: EventRecord) -> list[c.Command]:
        definition = record.data.get("definition")
        triggers = definition.get("triggers") if isinstance(definition, dict) else None
        workflow = record.data.get("name")  # DefinitionChanged has none: keep the first
        name = str(workflow) if workflow is not None else None
        self.view.put_triggers(record.originator_id, name, _strings(triggers))
        workflow_name = self.view.put_limit(record.originator_id, name, Limit.of(definition))
        if workflow_name is None:
            return []
        # A raised (or lifted) limit frees slots at once.
        return self._release(workflow_name, None, record.position)

    @_on("InboundEvent.Received")
    def _event_received(self, record: EventRecord) -> list[c.Command]:
        event_id = record.originator_id
        name = _text(record, "name")
        data = record.data.get("data")
        commands: list[c.Command] = [
            c.TriggerRun(event_id=event_id, workflow=workflow)
            for workflow in sorted(self.view.triggered_workflows(name))
        ]
        commands += [
            c.DeliverEvent(run_id=wait.run_id, name=wait.name, event_id=event_id)
            for wait in self.view.open_waits(name)
            if matches(wait.match, data)
        ]
        return commands


def _text(record: EventRecord, field: str) -> str:
    return str(record.data[field])


def _when(value: JSON) -> datetime:
    return datetime.fromisoformat(str(value))


def _strings(value: JSON) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


class MemorySchedulerView:
    """The scheduler's tables in memory (unit tests, and a reference for the real one)."""

    def __init__(self) -> None:
        self.timers: dict[tuple[UUID, str, str], Timer] = {}
        self.leases: dict[UUID, Lease] = {}
        self.waits: dict[tuple[UUID, str], Wait] = {}
        self.parents: dict[UUID, Parent] = {}
        self.triggers: dict[UUID, tuple[str, set[str]]] = {}
        self.limits: dict[UUID, tuple[str, Limit | None]] = {}
        self.slots: dict[UUID, Slot] = {}

    def put_timer(self, timer: Timer) -> None:
        self.timers[(timer.run_id, timer.kind, timer.name)] = timer

    def delete_timer(self, run_id: UUID, kind: TimerKind, name: str) -> None:
        self.timers.pop((run_id, kind, name), None)

    def put_lease(self, lease: Lease) -> None:
        self.leases[lease.run_id] = lease

    def delete_lease(self, run_id: UUID) -> None:
        self.leases.pop(run_id, None)

    def put_wait(self, wait: Wait) -> None:
        self.waits[(wait.run_id, wait.name)] = wait

    def delete_wait(self, run_id: UUID, name: str) -> None:
        self.waits.pop((run_id, name), None)

    def open_waits(self, event_name: str) -> list[Wait]:
        return [w for w in self.waits.values() if w.event_name == event_name]

    def put_parent(self, run_id: UUID, parent: Parent) -> None:
        self.parents[run_id] = parent

    def parent_of(self, run_id: UUID) -> Parent | None:
        return self.parents.get(run_id)

    def end_run(self, run_id: UUID) -> None:
        self.timers = {k: t for k, t in self.timers.items() if k[0] != run_id}
        self.leases.pop(run_id, None)
        self.waits = {k: w for k, w in self.waits.items() if k[0] != run_id}
        self.parents.pop(run_id, None)

    def put_triggers(self, type_id: UUID, workflow: str | None, triggers: Iterable[str]) -> None:
        if workflow is None:
            if type_id not in self.triggers:
                return  # redefined before registered: impossible in one log
            workflow = self.triggers[type_id][0]
        self.triggers[type_id] = (workflow, set(triggers))

    def triggered_workflows(self, event_name: str) -> list[str]:
        return sorted(w for w, names in self.triggers.values() if event_name in names)

    def put_limit(self, type_id: UUID, workflow: str | None, limit: Limit | None) -> str | None:
        if workflow is None:
            if type_id not in self.limits:
                return None
            workflow = self.limits[type_id][0]
        self.limits[type_id] = (workflow, limit)
        return workflow

    def limit_of(self, workflow: str) -> Limit | None:
        for name, limit in self.limits.values():
            if name == workflow:
                return limit
        return None

    def slot_of(self, run_id: UUID) -> Slot | None:
        return self.slots.get(run_id)

    def put_slot(self, slot: Slot) -> None:
        self.slots[slot.run_id] = slot

    def delete_slot(self, run_id: UUID) -> None:
        self.slots.pop(run_id, None)

    def held(self, workflow: str, group: str) -> int:
        return sum(
            1
            for s in self.slots.values()
            if s.workflow == workflow and s.group == group and s.state == "held"
        )

    def queued(self, workflow: str, group: str | None, limit: int) -> list[Slot]:
        waiting = [
            s
            for s in self.slots.values()
            if s.workflow == workflow and s.state == "queued" and group in (None, s.group)
        ]
        return sorted(waiting, key=lambda s: (s.since, str(s.run_id)))[:limit]
