"""The scheduler's decisions: given an event, the commands it sends and the rows it keeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

from domain.errors import EventNotFoundError, UnknownWorkflowError
from domain.ids import run_id_for
from domain.values import JSON
from projections.records import EventRecord
from services import commands as c
from services.scheduler import (
    EAGER_LEASE,
    LEASE_GRACE,
    Lease,
    Limit,
    MemorySchedulerView,
    Parent,
    Scheduler,
    Slot,
    Timer,
    Wait,
)
from services.workflow_runs import RunStartedReply, WorkflowRuns

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RUN = UUID("00000000-0000-0000-0000-0000000000a1")


class Log:
    """Records at consecutive positions through one scheduler over one in-memory view."""

    def __init__(self) -> None:
        self.view = MemorySchedulerView()
        self.scheduler = Scheduler(self.view)
        self.position = 0
        self.records: list[EventRecord] = []

    def given(
        self, kind: str, data: dict[str, JSON] | None = None, originator: UUID = RUN
    ) -> list[c.Command]:
        aggregate, _, event_type = kind.rpartition(".")
        self.position += 1
        record = EventRecord(
            position=self.position,
            prev_position=self.position - 1,
            originator_id=originator,
            version=self.position,
            aggregate=aggregate or "WorkflowRun",
            type=event_type,
            timestamp=T0,
            data=data or {},
        )
        self.records.append(record)
        return self.scheduler.process(record)


def run_started(
    parent: UUID | None = None, step: str | None = None, run_timeout: float | None = None
) -> dict[str, JSON]:
    return {
        "workflow": "flow",
        "timeouts": {"run": run_timeout, "step": None, "heartbeat": None},
        "parent_run_id": str(parent) if parent else None,
        "parent_step": step,
        "triggered_by": None,
    }


def test_a_started_run_is_dispatched_by_the_position_of_its_start() -> None:
    log = Log()
    assert log.given("RunStarted", run_started()) == [
        c.DispatchRun(run_id=RUN, reason="start", cause=1)
    ]
    assert log.view.timers == {}


def test_each_event_that_makes_a_run_movable_dispatches_it() -> None:
    reasons = {
        "TimerFired": ("timer", {"name": "nap"}),
        "EventReceived": ("event", {"name": "w"}),
        "WaitTimedOut": ("wait_timeout", {"name": "w"}),
        "ChildCompleted": ("child", {"name": "kid"}),
        "RunRetried": ("retried", {}),
        "CompensationStarted": ("compensate", {"reason": "failed"}),
    }
    for event_type, (reason, data) in reasons.items():
        log = Log()
        log.position = 41
        assert log.given(event_type, data) == [
            c.DispatchRun(run_id=RUN, reason=reason, cause=42)
        ], event_type


def test_steps_and_sleeps_alone_dispatch_nothing() -> None:
    log = Log()
    assert log.given("StepStarted", {"step": "a", "attempt": 1}) == []
    assert log.given("StepCompleted", {"step": "a", "attempt": 1}) == []


def test_a_sleep_keeps_a_timer_until_it_fires() -> None:
    log = Log()
    wake_at = T0 + timedelta(minutes=10)
    log.given("SleepStarted", {"name": "nap", "wake_at": wake_at.isoformat()})
    assert list(log.view.timers.values()) == [Timer(RUN, "sleep", "nap", wake_at)]
    assert Timer(RUN, "sleep", "nap", wake_at).command() == c.FireTimer(run_id=RUN, name="nap")
    log.given("TimerFired", {"name": "nap"})
    assert log.view.timers == {}


def test_a_scheduled_retry_dispatches_by_its_own_position_until_the_step_starts() -> None:
    log = Log()
    log.position = 6
    due_at = T0 + timedelta(seconds=2)
    log.given("RetryScheduled", {"step": "charge", "attempt": 2, "due_at": due_at.isoformat()})
    (timer,) = log.view.timers.values()
    assert timer == Timer(RUN, "retry", "charge", due_at, cause=7)
    assert timer.command() == c.DispatchRun(run_id=RUN, reason="retry", cause=7)
    log.given("StepStarted", {"step": "other", "attempt": 1})
    assert len(log.view.timers) == 1
    log.given("StepStarted", {"step": "charge", "attempt": 2})
    assert log.view.timers == {}


def test_an_eager_start_is_leased_to_its_starter_until_its_run_ends() -> None:
    log = Log()
    dispatched = {"reason": "eager", "cause": 0, "dispatch": 1, "queue": "q"}
    assert log.given("TaskDispatched", dispatched) == []
    assert log.view.timers == {}
    assert log.view.leases == {RUN: Lease(RUN, T0 + EAGER_LEASE, cause=1)}
    assert log.view.leases[RUN].command() == c.DispatchRun(
        run_id=RUN, reason="eager_expired", cause=1
    )
    log.given("RunCompleted", {"output": None})
    assert log.view.leases == {}


def test_a_queued_hand_off_takes_no_lease_and_the_lease_is_the_schedulers_to_set() -> None:
    log = Log()
    log.given("TaskDispatched", {"reason": "start", "cause": 0, "dispatch": 1, "queue": "q"})
    assert log.view.leases == {}
    short = Log()
    short.scheduler = Scheduler(short.view, timedelta(seconds=2))
    short.given("TaskDispatched", {"reason": "eager", "cause": 0, "dispatch": 1, "queue": "q"})
    assert [lease.due_at for lease in short.view.leases.values()] == [T0 + timedelta(seconds=2)]


def test_a_lease_ends_when_its_run_waits_for_the_scheduler_or_goes_to_its_queue() -> None:
    eager = {"reason": "eager", "cause": 0, "dispatch": 1, "queue": "q"}
    suspends: list[tuple[str, dict[str, JSON]]] = [
        ("SleepStarted", {"name": "nap", "wake_at": T0.isoformat()}),
        ("RetryScheduled", {"step": "s", "attempt": 2, "due_at": T0.isoformat()}),
        ("WaitStarted", {"name": "w", "event_name": "e", "match": {}}),
        ("ChildStarted", {"name": "c", "run_id": str(uuid4()), "workflow": "f"}),
        ("TaskDispatched", {"reason": "eager_expired", "cause": 1, "dispatch": 2, "queue": "q"}),
    ]
    for kind, data in suspends:
        log = Log()
        log.given("TaskDispatched", eager)
        log.given(kind, data)
        assert log.view.leases == {}, kind
    log = Log()
    log.given("TaskDispatched", eager)
    log.given("StepStarted", {"step": "s", "attempt": 1})
    assert list(log.view.leases) == [RUN]


def test_a_due_lease_is_renewed_while_its_holder_answers_and_expires_after_two_silences() -> None:
    lease, now = Lease(RUN, T0, cause=4), T0 + timedelta(seconds=1)
    assert lease.after(True, now) == Lease(RUN, now + EAGER_LEASE, cause=4)
    assert lease.after(None, now) == lease  # the scheduler could not ask: nothing changes
    suspect = lease.after(False, now)
    assert suspect == Lease(RUN, now + LEASE_GRACE, cause=4, suspect=True)
    assert isinstance(suspect, Lease)
    # A holder back after a blip keeps its run; one silent twice loses it.
    assert suspect.after(True, now) == Lease(RUN, now + EAGER_LEASE, cause=4)
    assert suspect.after(False, now) == lease.command()


def test_a_wait_is_indexed_and_its_timeout_kept_until_it_is_settled() -> None:
    for settled in ("EventReceived", "WaitTimedOut"):
        log = Log()
        timeout_at = T0 + timedelta(days=3)
        log.given(
            "WaitStarted",
            {
                "name": "shipped",
                "event_name": "ship",
                "match": {"order": 1},
                "timeout_at": timeout_at.isoformat(),
            },
        )
        assert log.view.open_waits("ship") == [Wait(RUN, "shipped", "ship", {"order": 1})]
        (timer,) = log.view.timers.values()
        assert timer.command() == c.TimeOutWait(run_id=RUN, name="shipped")
        log.given(settled, {"name": "shipped"})
        assert log.view.waits == {} and log.view.timers == {}, settled


def test_a_wait_without_a_timeout_has_no_timer() -> None:
    log = Log()
    log.given("WaitStarted", {"name": "w", "event_name": "e", "match": {}, "timeout_at": None})
    assert log.view.timers == {} and len(log.view.waits) == 1


def test_a_run_timeout_is_a_timer_from_the_start() -> None:
    log = Log()
    log.given("RunStarted", run_started(run_timeout=90))
    (timer,) = log.view.timers.values()
    assert timer == Timer(RUN, "run", "", T0 + timedelta(seconds=90))
    assert timer.command() == c.TimeOutRun(run_id=RUN)


def test_a_run_that_ends_forgets_every_timer_and_wait() -> None:
    for end in ("RunCompleted", "RunFailed", "RunCancelled", "RunTimedOut"):
        log = Log()
        log.given("RunStarted", run_started(run_timeout=90))
        log.given("SleepStarted", {"name": "nap", "wake_at": T0.isoformat()})
        log.given("WaitStarted", {"name": "w", "event_name": "e", "match": {}, "timeout_at": None})
        assert log.given(end, {}) == []
        assert log.view.timers == {} and log.view.waits == {}, end


def test_a_childs_end_resolves_its_parent() -> None:
    parent = uuid4()
    for end in ("RunCompleted", "RunFailed", "RunCancelled", "RunTimedOut"):
        log = Log()
        log.given("RunStarted", run_started(parent=parent, step="invoice"))
        assert log.view.parent_of(RUN) == Parent(parent, "invoice")
        assert log.given(end, {}) == [c.ResolveChild(run_id=parent, name="invoice")], end
        assert log.view.parent_of(RUN) is None


def test_an_inbound_event_triggers_its_workflows_and_wakes_matching_waits() -> None:
    log = Log()
    bill, pack, other = uuid4(), uuid4(), uuid4()
    for type_id, name, triggers in (
        (bill, "bill", ["order.placed"]),
        (pack, "pack", ["x"]),
        (other, "other", ["order.cancelled"]),
    ):
        definition: dict[str, JSON] = {"triggers": list(triggers)}
        log.given("WorkflowType.Registered", {"name": name, "definition": definition}, type_id)
    # pack learns the trigger later: the index follows the new definition
    log.given(
        "WorkflowType.DefinitionChanged",
        {"definition": {"triggers": ["order.placed", "x"]}},
        pack,
    )
    one, two = uuid4(), uuid4()
    for run_id, order in ((one, 1), (two, 2)):
        data: dict[str, JSON] = {
            "name": "placed",
            "event_name": "order.placed",
            "match": {"order_id": order},
            "timeout_at": None,
        }
        log.given("WaitStarted", data, run_id)
    event_id = uuid4()
    commands = log.given(
        "InboundEvent.Received",
        {"name": "order.placed", "data": {"order_id": 1, "total": 5}},
        event_id,
    )
    assert commands == [
        c.TriggerRun(event_id=event_id, workflow="bill"),
        c.TriggerRun(event_id=event_id, workflow="pack"),
        c.DeliverEvent(run_id=one, name="placed", event_id=event_id),
    ]


def test_an_event_nobody_listens_to_changes_nothing() -> None:
    log = Log()
    assert log.given("InboundEvent.Received", {"name": "noise", "data": {}}, uuid4()) == []


def test_triggering_a_run_twice_starts_one_run_recorded_on_the_event() -> None:
    app = WorkflowRuns(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    app.handle(c.RegisterWorkflow(name="bill", triggers=["order.placed"]))
    event_id = app.send_event(c.SendEvent(name="order.placed", data={"order_id": 1})).event_id
    trigger = c.TriggerRun(event_id=event_id, workflow="bill")
    first, again = app.execute([trigger, trigger])
    assert isinstance(first, RunStartedReply) and isinstance(again, RunStartedReply)
    assert first.created and not again.created and first.run_id == again.run_id
    assert app.trigger_run(trigger).run_id == first.run_id
    run = app.get_run(first.run_id)
    assert (run.workflow, run.input, run.triggered_by) == ("bill", {"order_id": 1}, event_id)
    assert run.key == f"event:{event_id}"
    assert first.run_id == run_id_for("bill", f"event:{event_id}")
    assert app.get_inbound_event(event_id).triggered == {"bill": first.run_id}


def test_triggering_an_unknown_workflow_or_event_is_refused() -> None:
    app = WorkflowRuns(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    app.handle(c.RegisterWorkflow(name="bill"))
    event_id = app.send_event(c.SendEvent(name="e")).event_id
    (unknown,) = app.execute([c.TriggerRun(event_id=event_id, workflow="nope")])
    assert isinstance(unknown, UnknownWorkflowError)
    (missing,) = app.execute([c.TriggerRun(event_id=uuid4(), workflow="bill")])
    assert isinstance(missing, EventNotFoundError)


# ------------------------------------------------------------------- concurrency limits
LIMITED = UUID("00000000-0000-0000-0000-00000000000f")


def limited(limit: int | None, key: str | None = None) -> Log:
    """A log whose workflow ``flow`` has a concurrency limit (None: unlimited)."""
    log = Log()
    definition: dict[str, JSON] = {"concurrency": {"limit": limit, "key": key}}
    log.given("WorkflowType.Registered", {"name": "flow", "definition": definition}, LIMITED)
    return log


def start(log: Log, run_id: UUID, run_input: JSON = None) -> list[c.Command]:
    return log.given("RunStarted", {**run_started(), "input": run_input}, run_id)


def dispatched(commands: list[c.Command]) -> list[tuple[UUID, str, int]]:
    return [(d.run_id, d.reason, d.cause) for d in commands if isinstance(d, c.DispatchRun)]


def runs(n: int) -> list[UUID]:
    return [UUID(int=0xB00 + i) for i in range(n)]


def test_a_limit_holds_back_runs_beyond_it_until_a_slot_frees() -> None:
    log = limited(2)
    one, two, three, four = runs(4)
    assert dispatched(start(log, one)) == [(one, "start", 2)]
    assert dispatched(start(log, two)) == [(two, "start", 3)]
    assert start(log, three) == [] and start(log, four) == []  # held back: stay queued
    assert log.view.slots[three] == Slot(three, "flow", "null", "queued", 4)
    assert log.view.held("flow", "null") == 2

    # The end of one run releases the oldest held-back run, by the position of the end.
    assert dispatched(log.given("RunCompleted", {}, two)) == [(three, "released", 6)]
    assert log.view.held("flow", "null") == 2
    assert dispatched(log.given("RunCancelled", {"reason": None}, one)) == [(four, "released", 7)]
    assert log.given("RunCompleted", {}, three) == []
    assert log.given("RunCompleted", {}, four) == []
    assert log.view.slots == {}


def test_a_run_ended_while_queued_leaves_the_queue_and_frees_nothing() -> None:
    log = limited(1)
    one, two, three = runs(3)
    start(log, one), start(log, two), start(log, three)
    assert log.given("RunCancelled", {"reason": None}, two) == []
    assert dispatched(log.given("RunCompleted", {}, one)) == [(three, "released", 6)]


def test_limits_per_key_are_independent_and_a_missing_key_is_null() -> None:
    log = limited(1, key="customer")
    a1, a2, b1, n1, n2 = runs(5)
    assert dispatched(start(log, a1, {"customer": "a"})) == [(a1, "start", 2)]
    assert start(log, a2, {"customer": "a"}) == []
    assert dispatched(start(log, b1, {"customer": "b"})) == [(b1, "start", 4)]
    assert dispatched(start(log, n1, {"other": 1})) == [(n1, "start", 5)]
    assert start(log, n2, "not an object") == []  # no field: the null group, full
    assert log.view.slots[n2].group == "null"
    # b's end frees b's slot: nothing of a's moves.
    assert log.given("RunCompleted", {}, b1) == []
    assert dispatched(log.given("RunCompleted", {}, a1)) == [(a2, "released", 8)]
    assert dispatched(log.given("RunCompleted", {}, n1)) == [(n2, "released", 9)]


def test_redelivered_starts_and_ends_are_idempotent() -> None:
    log = limited(1)
    one, two, three = runs(3)
    start(log, one), start(log, two), start(log, three)
    first, second, third = log.records[1:4]
    # A redelivered start never takes a second slot, nor dispatches a queued run.
    assert dispatched(log.scheduler.process(first)) == [(one, "start", 2)]
    assert log.scheduler.process(second) == [] and log.scheduler.process(third) == []
    assert log.view.held("flow", "null") == 1
    assert dispatched(log.given("RunCompleted", {}, one)) == [(two, "released", 5)]
    # Releasing twice is a no-op: three stays queued behind two.
    assert log.scheduler.process(log.records[-1]) == []
    assert log.given("RunCompleted", {}, one) == []
    assert log.view.slots[three].state == "queued"
    assert log.view.held("flow", "null") == 1


def test_a_retried_failed_run_takes_a_slot_again_or_queues() -> None:
    log = limited(1)
    one, two = runs(2)
    start(log, one)
    log.given("RunFailed", {}, one)
    assert log.view.slots[one].state == "ended"  # kept for a retry
    start(log, two)
    assert log.given("RunRetried", {}, one) == []  # two holds the only slot
    assert dispatched(log.given("RunCompleted", {}, two)) == [(one, "released", 6)]
    log.given("RunTimedOut", {}, one)
    assert dispatched(log.given("RunRetried", {}, one)) == [(one, "retried", 8)]
    assert log.view.held("flow", "null") == 1


def test_workflows_without_a_limit_are_unaffected() -> None:
    log = limited(None)
    one, two, three = runs(3)
    for run_id in (one, two, three):
        assert len(dispatched(start(log, run_id))) == 1
    assert log.view.slots == {}
    assert log.given("RunFailed", {}, one) == []
    assert dispatched(log.given("RunRetried", {}, one)) == [(one, "retried", 6)]


def test_raising_the_limit_releases_queued_runs_at_once() -> None:
    log = limited(1)
    one, two, three = runs(3)
    start(log, one), start(log, two), start(log, three)
    changed: dict[str, JSON] = {"definition": {"concurrency": {"limit": 2, "key": None}}}
    assert dispatched(log.given("WorkflowType.DefinitionChanged", changed, LIMITED)) == [
        (two, "released", 5)
    ]
    lifted: dict[str, JSON] = {"definition": {"concurrency": {"limit": None, "key": None}}}
    assert dispatched(log.given("WorkflowType.DefinitionChanged", lifted, LIMITED)) == [
        (three, "released", 6)
    ]
    assert Limit.of({"concurrency": {"limit": 0}}) is None


class _Nats:
    """What the scheduler's question to a holder sees of its NATS connection."""

    def __init__(self, answer: object, connected: bool = True, reconnects: int = 0) -> None:
        self.answer = answer
        self.is_connected = connected
        self.stats = {"reconnects": 0}
        self._reconnects = reconnects

    async def request(self, subject: str, payload: bytes, timeout: float) -> object:
        self.stats["reconnects"] += self._reconnects
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_a_holder_is_asked_and_only_held_is_an_answer_while_the_scheduler_itself_is_connected() -> (
    None
):
    import asyncio
    from types import SimpleNamespace

    import nats.errors

    from infrastructure.nats.names import Names
    from infrastructure.scheduler_runner import held_over_nats

    def ask(nc: _Nats) -> bool | None:
        async def asked() -> bool | None:
            return await held_over_nats(nc, Names("t"))(RUN)

        return asyncio.run(asked())

    assert ask(_Nats(SimpleNamespace(data=b"held"))) is True
    assert ask(_Nats(SimpleNamespace(data=b"+OK"))) is False  # something else answered
    assert ask(_Nats(nats.errors.NoRespondersError())) is False
    assert ask(_Nats(nats.errors.TimeoutError())) is False
    # The scheduler was the one cut off: it cannot tell, and decides nothing.
    assert ask(_Nats(nats.errors.TimeoutError(), reconnects=1)) is None
    assert ask(_Nats(SimpleNamespace(data=b"held"), connected=False)) is None
    assert ask(_Nats(nats.errors.ConnectionClosedError())) is None
