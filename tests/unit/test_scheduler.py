"""The scheduler's decisions: given an event, the commands it sends and the rows it keeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

from domain.errors import EventNotFoundError, UnknownWorkflowError
from domain.ids import run_id_for
from domain.values import JSON
from projections.records import EventRecord
from services import commands as c
from services.scheduler import MemorySchedulerView, Parent, Scheduler, Timer, Wait
from services.workflow_runs import RunStartedReply, WorkflowRuns

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RUN = UUID("00000000-0000-0000-0000-0000000000a1")


class Log:
    """Records at consecutive positions through one scheduler over one in-memory view."""

    def __init__(self) -> None:
        self.view = MemorySchedulerView()
        self.scheduler = Scheduler(self.view)
        self.position = 0

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
