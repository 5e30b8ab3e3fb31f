"""Read models fed duplicates, redeliveries and losses equal those fed each record once."""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any
from uuid import UUID

from hypothesis import event, given
from hypothesis import strategies as st

from domain.errors import DomainError
from domain.values import RetryPolicy
from infrastructure.event_log import read_after
from projections.memory import InMemoryReadModels
from projections.records import EventRecord
from services import commands as c
from services.clock import ManualClock
from services.workflow_runs import WorkflowRuns

RUN = st.integers(min_value=0, max_value=7)
STEP = st.sampled_from(["charge", "reserve", "ship"])
NAME = st.sampled_from(["a", "b"])
TOPIC = st.sampled_from(["order.placed", "paid"])
OUTPUT = st.one_of(
    st.none(), st.integers(), st.text(max_size=4), st.lists(st.booleans(), max_size=2)
)

STEPPING = st.one_of(
    st.tuples(st.just("step"), RUN, STEP),
    st.tuples(st.just("complete"), RUN, STEP, st.booleans(), OUTPUT),
    st.tuples(st.just("fail"), RUN, STEP, st.booleans(), st.sampled_from(["Transient", "Fatal"])),
)
ACTIONS = st.one_of(
    STEPPING,
    STEPPING,
    st.tuples(
        st.just("start"), st.sampled_from(["shop", "mail"]), st.none() | st.sampled_from("xy")
    ),
    st.tuples(st.just("step"), RUN, STEP),
    st.tuples(st.just("complete"), RUN, STEP, st.booleans(), OUTPUT),
    st.tuples(st.just("fail"), RUN, STEP, st.booleans(), st.sampled_from(["Transient", "Fatal"])),
    st.tuples(st.just("sleep"), RUN, NAME),
    st.tuples(st.just("fire"), RUN),
    st.tuples(st.just("wait"), RUN, NAME, TOPIC),
    st.tuples(st.just("send"), TOPIC, OUTPUT),
    st.tuples(st.just("deliver"), RUN, st.just("a"), st.integers(min_value=0, max_value=3)),
    st.tuples(st.just("time_out_wait"), RUN),
    st.tuples(st.just("child"), RUN, NAME),
    st.tuples(st.just("end_child"), RUN, st.sampled_from(["complete", "fail", "cancel"])),
    st.tuples(st.just("emit"), RUN, NAME),
    st.tuples(st.just("trigger"), st.integers(min_value=0, max_value=3), RUN),
    st.tuples(st.just("end"), RUN, st.sampled_from(["complete", "fail", "time_out", "cancel"])),
    st.tuples(st.just("retry"), RUN),
    st.tuples(st.just("compensate"), RUN),
    st.tuples(st.just("worker"), st.sampled_from(["shop", "mail"]), st.sampled_from(["w1", "w2"])),
)


class Workload:
    """Interprets abstract actions as commands on the real service (refusals are fine)."""

    def __init__(self) -> None:
        self.app = WorkflowRuns(
            env={"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=ManualClock(), rand=lambda: 0.5
        )
        self.runs: list[UUID] = []
        self.events: list[UUID] = []
        policy = RetryPolicy(max_attempts=2, non_retryable_error_types=("Fatal",))
        for name in ("shop", "mail"):
            self.app.register_workflow(c.RegisterWorkflow(name=name, retry_policy=policy))

    def apply(self, action: tuple[Any, ...]) -> None:
        with contextlib.suppress(DomainError):  # a refusal appends nothing: the workload goes on
            self._apply(action)

    def _run(self, index: int) -> UUID:
        if not self.runs:
            raise DomainError("no run yet")
        return self.runs[index % len(self.runs)]

    def _apply(self, action: tuple[Any, ...]) -> None:
        kind, *args = action
        app = self.app
        if kind == "start":
            reply = app.start_run(c.StartRun(workflow=args[0], input={"n": 1}, key=args[1]))
            if reply.run_id not in self.runs:
                self.runs.append(reply.run_id)
        elif kind == "step":
            run_id = self._run(args[0])
            state = app.get_run(run_id).steps.get(args[1])
            attempt = (state.attempts if state else 0) + 1
            app.start_step(c.StartStep(run_id=run_id, step=args[1], attempt=attempt))
        elif kind in ("complete", "fail"):
            run_id = self._run(args[0])
            state = app.get_run(run_id).steps.get(args[1])
            if state is None or state.status.value in ("pending", "retrying"):
                self._apply(("step", *args[:2]))  # most reports follow their start at once
                state = app.get_run(run_id).steps[args[1]]
            attempt = state.attempts
            if kind == "complete":
                app.complete_step(
                    c.CompleteStep(
                        run_id=run_id,
                        step=args[1],
                        attempt=attempt,
                        compensable=args[2],
                        output=args[3],
                    )
                )
            else:
                error = c.StepError(type=args[3], message="boom")
                app.fail_step(
                    c.FailStep(
                        run_id=run_id, step=args[1], attempt=attempt, error=error, retryable=args[2]
                    )
                )
        elif kind == "sleep":
            app.start_sleep(c.StartSleep(run_id=self._run(args[0]), name=args[1], seconds=5))
        elif kind == "fire":
            run = app.get_run(self._run(args[0]))
            for name in [n for n, s in run.sleeps.items() if not s.fired][:1]:
                app.fire_timer(c.FireTimer(run_id=run.id, name=name))
        elif kind == "wait":
            app.start_wait(
                c.StartWait(
                    run_id=self._run(args[0]), name=args[1], event_name=args[2], timeout_seconds=60
                )
            )
        elif kind == "send":
            sent = app.send_event(c.SendEvent(name=args[0], data={"v": args[1]}))
            self.events.append(sent.event_id)
        elif kind == "deliver":
            run_id = self._run(args[0])
            waits = app.get_run(run_id).waits
            pending = [n for n, w in waits.items() if w.outcome == "pending"] or [args[1]]
            wait = waits.get(pending[0])
            candidates = [
                e for e in self.events if wait and app.get_inbound_event(e).name == wait.event_name
            ]
            if candidates:
                event_id = candidates[args[2] % len(candidates)]
                app.deliver_event(c.DeliverEvent(run_id=run_id, name=pending[0], event_id=event_id))
        elif kind == "time_out_wait":
            run = app.get_run(self._run(args[0]))
            for name in [n for n, w in run.waits.items() if w.outcome == "pending"][:1]:
                app.time_out_wait(c.TimeOutWait(run_id=run.id, name=name))
        elif kind == "child":
            run_id = self._run(args[0])
            app.start_child(c.StartChild(run_id=run_id, name=args[1], workflow="mail"))
            child = app.get_run(run_id).children[args[1]].run_id
            if child not in self.runs:
                self.runs.append(child)
        elif kind == "end_child":
            run_id = self._run(args[0])
            children = app.get_run(run_id).children
            for name in [n for n, s in children.items() if s.outcome == "pending"][:1]:
                with contextlib.suppress(DomainError):  # it may have ended already
                    self._end(children[name].run_id, args[1])
                app.resolve_child(c.ResolveChild(run_id=run_id, name=name))
        elif kind == "emit":
            emitted = app.emit_event(
                c.EmitEvent(run_id=self._run(args[0]), name=args[1], event_name="sent", data={})
            )
            self.events.append(emitted.event_id)
        elif kind == "trigger" and self.events:
            inbound = app.get_inbound_event(self.events[args[0] % len(self.events)])
            inbound.record_triggered_run("shop", self._run(args[1]))
            app.save(inbound)
        elif kind == "end":
            self._end(self._run(args[0]), args[1])
        elif kind == "retry":
            app.retry_run(c.RetryRun(run_id=self._run(args[0])))
        elif kind == "compensate":
            run = app.get_run(self._run(args[0]))
            pending = run.compensations_pending()
            if pending:
                app.compensate_step(c.CompensateStep(run_id=run.id, step=pending[0]))
        elif kind == "worker":
            app.register_workflow(c.RegisterWorkflow(name=args[0], worker_id=args[1]))
            if args[1] == "w2":  # and sometimes it leaves again
                workflow_type = app.get_workflow_type(args[0])
                workflow_type.remove_worker("w1")
                app.save(workflow_type)

    def _end(self, run_id: UUID, how: str) -> None:
        error = c.StepError(type="Fatal", message="no")
        if how == "complete":
            self.app.complete_run(c.CompleteRun(run_id=run_id, output="ok"))
        elif how == "fail":
            self.app.fail_run(c.FailRun(run_id=run_id, error=error))
        elif how == "time_out":
            self.app.time_out_run(c.TimeOutRun(run_id=run_id))
        else:
            self.app.cancel_run(c.CancelRun(run_id=run_id, reason="stop"))

    def records(self, after: int = 0) -> list[EventRecord]:
        return read_after(self.app, after, 1_000_000)


def fed_once(records: list[EventRecord]) -> InMemoryReadModels:
    models = InMemoryReadModels()
    models.apply_all(records, lambda after, until: [])
    return models


@st.composite
def deliveries(draw: st.DrawFn, records: list[EventRecord]) -> list[list[EventRecord]]:
    """Batches as one JetStream consumer might see them: new records in log order, with
    earlier ones redelivered in between, duplicates, and some records lost for good."""
    batches: list[list[EventRecord]] = []
    delivered: list[EventRecord] = []
    following = 0
    while following < len(records):
        batch: list[EventRecord] = []
        for _ in range(draw(st.integers(min_value=1, max_value=6))):
            fate = draw(st.sampled_from(["next", "next", "next", "again", "lost"]))
            if fate == "again" and delivered:
                batch.append(draw(st.sampled_from(delivered)))
            elif following < len(records):
                if fate != "lost":
                    batch.append(records[following])
                    delivered.append(records[following])
                following += 1
        batches.append(batch)
    return batches


@given(
    starts=st.lists(st.sampled_from(["shop", "mail"]), min_size=2, max_size=4),
    actions=st.lists(ACTIONS, min_size=10, max_size=60),
    data=st.data(),
)
def test_a_read_model_fed_a_chaotic_stream_equals_one_fed_each_record_once(
    starts: list[str], actions: list[tuple[Any, ...]], data: st.DataObject
) -> None:
    workload = Workload()
    for action in [("start", workflow, None) for workflow in starts] + actions:
        workload.apply(action)
    records = workload.records()
    event(f"records: {len(records) // 10 * 10}+")
    for status in sorted({workload.app.get_run(r).status.value for r in workload.runs}):
        event(f"a run {status}")
    event(f"types: {len({r.type for r in records}) // 5 * 5}+")
    event(f"runs: {len(workload.runs)}")

    def backfill(after: int, until: int) -> list[EventRecord]:
        return [r for r in workload.records(after) if r.position <= until]

    chaotic = InMemoryReadModels()
    for batch in data.draw(deliveries(records)):
        chaotic.apply_all(batch, backfill)
    # Records lost at the very end show no gap: the runner's idle catch-up reads them.
    for name, position in chaotic.positions.items():
        chaotic.apply(name, workload.records(position), backfill)

    once = fed_once(records)
    assert chaotic.views == once.views
    assert (
        chaotic.positions == once.positions == dict.fromkeys(once.positions, records[-1].position)
    )
    assert_mirrors_the_aggregates(workload, once)


def assert_mirrors_the_aggregates(workload: Workload, models: InMemoryReadModels) -> None:
    """Each run's row says what its aggregate says; counts add up to the runs' statuses."""
    views = models.views
    assert set(views.runs) == set(workload.runs)
    tally: Counter[tuple[str, str]] = Counter()
    for run_id, row in views.runs.items():
        run = workload.app.get_run(run_id)
        tally[(run.workflow, run.status.value)] += 1
        assert (row.status, row.output, row.error, row.version) == (
            run.status.value,
            run.output,
            run.error,
            run.version,
        )
        assert (row.cancel_requested, row.cancel_reason) == (
            run.cancel_requested,
            run.cancel_reason,
        )
        assert {n: (s.status, s.attempts, s.output, s.error) for n, s in row.steps.items()} == {
            n: (s.status.value, s.attempts, s.output, s.error) for n, s in run.steps.items()
        }
        assert {n: s.fired for n, s in row.sleeps.items()} == {
            n: s.fired for n, s in run.sleeps.items()
        }
        assert {n: w.outcome for n, w in row.waits.items()} == {
            n: w.outcome for n, w in run.waits.items()
        }
        assert {n: c.outcome for n, c in row.children.items()} == {
            n: c.outcome for n, c in run.children.items()
        }
    assert {k: n for k, n in views.run_counts.items() if n} == dict(tally)
    assert all(n >= 0 for n in views.run_counts.values())
    for event_id, inbound_row in views.inbound_events.items():
        inbound = workload.app.get_inbound_event(event_id)
        assert {t["workflow"]: UUID(str(t["run_id"])) for t in inbound_row.triggered} == (
            inbound.triggered
        )
        assert {(UUID(str(w["run_id"])), w["wait"]) for w in inbound_row.woken} == inbound.woken
    for workflow_row in views.workflows.values():
        workflow_type = workload.app.get_workflow_type(workflow_row.name)
        assert (workflow_row.definition, set(workflow_row.workers)) == (
            workflow_type.definition,
            workflow_type.workers,
        )
