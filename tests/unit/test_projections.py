"""Projection decisions: records from the real service layer, rows in in-memory views."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.domain import Aggregate

from domain.inbound_event import InboundEvent
from domain.values import RetryPolicy
from domain.workflow_run import WorkflowRun
from domain.workflow_type import WorkflowType
from infrastructure.event_log import read_after
from projections.catalog import PROJECTIONS, UnknownProjectionError, projection_names
from projections.inbound_events import InboundEventProjection
from projections.memory import InMemoryReadModels
from projections.projection import Projection, StreamMismatchError, in_order
from projections.records import EventRecord
from projections.runs import RunProjection, RunRow, UnknownRunError
from projections.workflows import WorkflowProjection
from services import commands as c
from services.clock import ManualClock
from services.workflow_runs import WorkflowRuns


class Given:
    """A workflow service on the in-memory store, and read models fed from its log."""

    def __init__(self) -> None:
        self.app = WorkflowRuns(
            env={"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=ManualClock(), rand=lambda: 0.5
        )
        self.models = InMemoryReadModels()
        self.app.register_workflow(
            c.RegisterWorkflow(
                name="shop",
                triggers=["order.placed"],
                retry_policy=RetryPolicy(max_attempts=3, non_retryable_error_types=("Fatal",)),
            )
        )

    def records(self, after: int = 0) -> list[EventRecord]:
        return read_after(self.app, after, 100_000)

    def project(self) -> InMemoryReadModels:
        """Apply whatever the store has that the read models have not seen yet."""
        for name in PROJECTIONS:
            after = self.models.positions[name]
            self.models.apply(name, self.records(after), self.backfill)
        return self.models

    def backfill(self, after: int, until: int) -> list[EventRecord]:
        return [r for r in self.records(after) if r.position <= until]

    def start(self, key: str | None = None) -> UUID:
        return self.app.start_run(c.StartRun(workflow="shop", input={"n": 1}, key=key)).run_id

    def run(self, run_id: UUID) -> RunRow:
        self.project()
        return self.models.views.runs[run_id]

    def counts(self) -> dict[str, int]:
        self.project()
        return {s: n for (w, s), n in self.models.views.run_counts.items() if n and w == "shop"}

    def step(self, run_id: UUID, step: str, attempt: int = 1) -> None:
        self.app.start_step(c.StartStep(run_id=run_id, step=step, attempt=attempt))

    def complete(
        self, run_id: UUID, step: str, attempt: int = 1, compensable: bool = False
    ) -> None:
        self.app.complete_step(
            c.CompleteStep(
                run_id=run_id, step=step, attempt=attempt, output={step: 1}, compensable=compensable
            )
        )

    def fail(self, run_id: UUID, step: str, attempt: int = 1, kind: str = "Transient") -> None:
        error = c.StepError(type=kind, message="boom")
        self.app.fail_step(c.FailStep(run_id=run_id, step=step, attempt=attempt, error=error))


@pytest.fixture
def given() -> Given:
    return Given()


def test_a_run_moves_through_its_statuses_and_its_count_moves_with_it(given: Given) -> None:
    run_id = given.start()
    assert given.run(run_id).status == "queued"
    assert given.counts() == {"queued": 1}

    given.step(run_id, "charge")
    assert given.run(run_id).status == "running"
    given.complete(run_id, "charge")
    given.app.start_sleep(c.StartSleep(run_id=run_id, name="nap", seconds=60))
    assert given.run(run_id).status == "sleeping"
    assert given.counts() == {"sleeping": 1}

    given.app.fire_timer(c.FireTimer(run_id=run_id, name="nap"))
    given.app.complete_run(c.CompleteRun(run_id=run_id, output={"done": True}))
    row = given.run(run_id)
    assert (row.status, row.output) == ("completed", {"done": True})
    assert given.counts() == {"completed": 1}
    assert row.sleeps["nap"].fired
    step = row.steps["charge"]
    assert (step.status, step.attempts, step.output) == ("completed", 1, {"charge": 1})
    assert step.started_at is not None and step.finished_at is not None
    assert step.started_at <= step.finished_at <= row.updated_at
    assert row.created_at <= step.started_at


def test_a_failed_attempt_is_retried_and_the_step_keeps_its_first_start_time(
    given: Given,
) -> None:
    run_id = given.start()
    given.step(run_id, "charge")
    started_at = given.run(run_id).steps["charge"].started_at
    given.fail(run_id, "charge")
    step = given.run(run_id).steps["charge"]
    assert (step.status, step.finished_at) == ("retrying", None)
    assert step.retry_due_at is not None
    assert step.error == {"type": "Transient", "message": "boom"}
    assert given.run(run_id).status == "running"  # only a retry pending: running (ADR 4)

    given.step(run_id, "charge", attempt=2)
    given.complete(run_id, "charge", attempt=2)
    step = given.run(run_id).steps["charge"]
    assert (step.status, step.attempts, step.error) == ("completed", 2, None)
    assert step.started_at == started_at


def test_a_failing_run_compensates_in_reverse_and_ends_failed(given: Given) -> None:
    run_id = given.start()
    for name in ("reserve", "charge"):
        given.step(run_id, name)
        given.complete(run_id, name, compensable=True)
    given.step(run_id, "ship")
    given.fail(run_id, "ship", kind="Fatal")
    assert given.run(run_id).steps["ship"].status == "failed"

    given.app.fail_run(c.FailRun(run_id=run_id, error=c.StepError(type="Fatal", message="no")))
    row = given.run(run_id)
    assert (row.status, row.compensation) == ("compensating", "failed")
    assert given.counts() == {"compensating": 1}

    given.app.compensate_step(c.CompensateStep(run_id=run_id, step="charge"))
    given.app.compensate_step(c.CompensateStep(run_id=run_id, step="reserve"))
    row = given.run(run_id)
    assert (row.status, row.error_type, row.compensation) == ("failed", "Fatal", None)
    assert [s.status for s in row.steps.values()] == ["compensated", "compensated", "failed"]
    assert given.counts() == {"failed": 1}


def test_an_operator_retry_requeues_the_run_and_reopens_its_failed_steps(given: Given) -> None:
    run_id = given.start()
    given.step(run_id, "a")
    given.complete(run_id, "a")
    given.step(run_id, "b")
    given.fail(run_id, "b", kind="Fatal")
    given.app.fail_run(c.FailRun(run_id=run_id, error=c.StepError(type="Fatal", message="no")))
    given.app.retry_run(c.RetryRun(run_id=run_id))
    row = given.run(run_id)
    assert (row.status, row.error) == ("queued", None)
    assert row.steps["a"].status == "completed"
    assert (row.steps["b"].status, row.steps["b"].started_at) == ("pending", None)
    assert row.steps["b"].attempts == 1  # attempt numbers keep growing
    given.step(run_id, "b", attempt=2)
    assert given.run(run_id).steps["b"].status == "running"


def test_a_cancel_waits_for_the_step_in_flight(given: Given) -> None:
    run_id = given.start()
    given.step(run_id, "a")
    given.app.cancel_run(c.CancelRun(run_id=run_id, reason="changed my mind"))
    row = given.run(run_id)
    assert (row.status, row.cancel_requested, row.cancel_reason) == (
        "running",
        True,
        "changed my mind",
    )
    given.complete(run_id, "a")
    assert given.run(run_id).status == "cancelled"
    assert given.counts() == {"cancelled": 1}


def test_a_waiting_run_is_woken_by_an_event_and_the_event_lists_it(given: Given) -> None:
    run_id = given.start()
    given.app.start_wait(
        c.StartWait(run_id=run_id, name="paid", event_name="payment.done", match={"order": 7})
    )
    assert given.run(run_id).status == "waiting"
    event_id = given.app.send_event(
        c.SendEvent(name="payment.done", data={"order": 7}, id="pay-7")
    ).event_id
    given.app.deliver_event(c.DeliverEvent(run_id=run_id, name="paid", event_id=event_id))
    row = given.run(run_id)
    wait = row.waits["paid"]
    assert (row.status, wait.outcome, wait.data) == ("running", "received", {"order": 7})
    assert wait.event_id == str(event_id)
    inbound = given.project().views.inbound_events[event_id]
    assert (inbound.name, inbound.external_id, inbound.data) == (
        "payment.done",
        "pay-7",
        {"order": 7},
    )
    assert [(w["run_id"], w["wait"]) for w in inbound.woken] == [(str(run_id), "paid")]


def test_an_event_that_triggers_a_run_lists_it(given: Given) -> None:
    event_id = given.app.send_event(c.SendEvent(name="order.placed", data={"order": 1})).event_id
    run_id = given.start()
    inbound = given.app.get_inbound_event(event_id)
    inbound.record_triggered_run("shop", run_id)
    given.app.save(inbound)
    row = given.project().views.inbound_events[event_id]
    assert [(t["workflow"], t["run_id"]) for t in row.triggered] == [("shop", str(run_id))]


def test_a_parent_waits_for_its_child_and_records_its_outcome(given: Given) -> None:
    parent = given.start()
    given.app.start_child(c.StartChild(run_id=parent, name="invoice", workflow="shop", input=1))
    row = given.run(parent)
    child_id = UUID(row.children["invoice"].run_id)
    assert row.status == "waiting"
    child = given.run(child_id)
    assert (child.parent_run_id, child.parent_step) == (parent, "invoice")

    given.app.complete_run(c.CompleteRun(run_id=child_id, output="INV-1"))
    given.app.resolve_child(c.ResolveChild(run_id=parent, name="invoice"))
    row = given.run(parent)
    assert (row.children["invoice"].outcome, row.children["invoice"].output) == (
        "completed",
        "INV-1",
    )
    assert row.status == "running"
    assert given.counts() == {"running": 1, "completed": 1}


def test_a_sent_event_is_listed_on_the_run_and_names_its_sender(given: Given) -> None:
    run_id = given.start()
    reply = given.app.emit_event(
        c.EmitEvent(run_id=run_id, name="announce", event_name="order.done", data={"n": 1})
    )
    sent = given.run(run_id).sent_events["announce"]
    assert (sent.event_name, sent.event_id) == ("order.done", str(reply.event_id))
    assert given.models.views.inbound_events[reply.event_id].sent_by_run == run_id


def test_workflows_track_definitions_and_workers(given: Given) -> None:
    given.app.register_workflow(c.RegisterWorkflow(name="shop", triggers=["x"], worker_id="w2"))
    given.app.register_workflow(c.RegisterWorkflow(name="shop", triggers=["x"], worker_id="w1"))
    workflow_type = given.app.get_workflow_type("shop")
    workflow_type.remove_worker("w2")
    given.app.save(workflow_type)
    (row,) = given.project().views.workflows.values()
    assert (row.name, row.triggers, row.workers) == ("shop", ["x"], ["w1"])
    assert row.version == workflow_type.version
    assert row.registered_at < row.updated_at


def test_duplicates_and_redeliveries_are_skipped_and_gaps_filled_from_the_store(
    given: Given,
) -> None:
    run_id = given.start()
    given.step(run_id, "a")
    given.complete(run_id, "a")
    records = given.records()
    first, second, third = records[-3:]
    base = first.prev_position
    backfills: list[tuple[int, int]] = []

    def backfill(after: int, until: int) -> list[EventRecord]:
        backfills.append((after, until))
        return given.backfill(after, until)

    assert in_order([third, first, first, second], base, backfill) == [first, second, third]
    assert in_order([first, second], second.position, backfill) == []
    assert backfills == []
    assert in_order([third, third], base, backfill) == [first, second, third]
    assert backfills == [(base, third.position)]


def test_a_record_the_store_does_not_have_is_refused() -> None:
    stranger = EventRecord(5, 4, uuid4(), 2, "WorkflowRun", "StepStarted", _now(), {})
    with pytest.raises(StreamMismatchError):
        in_order([stranger], 0, lambda after, until: [])


def test_a_record_of_an_unknown_type_changes_nothing_and_an_unknown_run_is_an_error(
    given: Given,
) -> None:
    run_id = given.start()
    models = given.project()
    before = models.views.runs[run_id]
    last = [r for r in given.records() if r.originator_id == run_id][-1]
    novel = replace(last, position=last.position + 1, prev_position=last.position)
    models.apply("runs", [replace(novel, type="SomethingNew")], given.backfill)
    assert models.views.runs[run_id] == before
    assert models.positions["runs"] == novel.position

    orphan = replace(novel, position=novel.position + 1, prev_position=novel.position)
    orphan = replace(orphan, originator_id=uuid4(), type="StepStarted")
    with pytest.raises(UnknownRunError):
        models.apply("runs", [orphan], given.backfill)


@pytest.mark.parametrize(
    ("aggregate", "projection"),
    [
        (WorkflowRun, RunProjection),
        (InboundEvent, InboundEventProjection),
        (WorkflowType, WorkflowProjection),
    ],
)
def test_every_domain_event_has_a_handler(
    aggregate: type[Aggregate], projection: type[Projection[Any]]
) -> None:
    events = {
        f"{aggregate.__name__}.{name}"
        for name, value in vars(aggregate).items()
        if isinstance(value, type)
        and issubclass(value, Aggregate.Event)
        and name not in ("Event", "Created")  # the library's per-class bases, never appended
    }
    assert events
    assert events <= projection.handled_types(), events - projection.handled_types()


def test_projection_names_are_known() -> None:
    assert projection_names() == ["runs", "workflows", "inbound_events"]
    assert projection_names("runs") == ["runs"]
    with pytest.raises(UnknownProjectionError):
        projection_names("nope")


def _now() -> datetime:
    return datetime.now(tz=UTC)


def test_an_events_data_becomes_plain_json_whatever_its_python_types() -> None:
    from enum import StrEnum

    from projections.records import jsonable

    class Colour(StrEnum):
        RED = "red"

    run_id = uuid4()
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    value = {
        "plain": ["a", 1, 2.5, True, None],
        "nested": {"id": run_id, "at": at, 7: (1, 2), "colour": Colour.RED},
        "set": {3, 1},
    }
    assert jsonable(value) == {
        "plain": ["a", 1, 2.5, True, None],
        "nested": {"id": str(run_id), "at": at.isoformat(), "7": [1, 2], "colour": "red"},
        "set": [1, 3],
    }
    with pytest.raises(TypeError):
        jsonable(object())


def test_a_linger_that_meets_nats_trouble_applies_what_was_fetched_first() -> None:
    """``ProjectionBuilder._more``: a timeout or a NATS error while lingering adds
    nothing; the batch fetched first is still applied (and acked after its commit)."""
    import asyncio
    from typing import cast

    import nats.errors

    from infrastructure.nats.names import Names
    from infrastructure.projection_runner import ProjectionBuilder

    class Failing:
        def __init__(self, error: Exception) -> None:
            self.error = error

        async def fetch(self, batch: int, timeout: float) -> list[object]:
            raise self.error

    builder = ProjectionBuilder(
        "read_models",
        "public",
        Names("p"),
        cast(Any, None),
        cast(Any, None),
        cast(Any, None),
        linger=0.001,
    )
    for error in (TimeoutError(), nats.errors.ConnectionClosedError()):
        assert asyncio.run(builder._more(cast(Any, Failing(error)), 10)) == []
