"""Handing a run to a worker: one dispatch per cause, and stale workers fenced off."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from domain.errors import InvalidCommandError, RunNotActiveError, SupersededError
from domain.ids import run_id_for
from domain.values import Concurrency, RetryPolicy
from domain.workflow_run import WorkflowRun
from services import commands as c
from services.workflow_runs import RunCompletedReply, RunLoaded, RunStartedReply
from tests.unit.scenario import Scenario

RUN = run_id_for("orders", "o-1")


def started() -> Scenario:
    """A run of a limited workflow: the scheduler, not its start, hands it off."""
    return Scenario().given(
        c.RegisterWorkflow(name="orders", queue="payments", concurrency=Concurrency(limit=5)),
        c.StartRun(workflow="orders", key="o-1", input={"n": 1}),
    )


def test_dispatching_a_run_hands_it_to_its_workflows_queue() -> None:
    s = started()
    s.when(c.DispatchRun(run_id=RUN, reason="started", cause=2)).then_events(["TaskDispatched"])
    dispatched = s.new_events[0]
    assert (dispatched.queue, dispatched.dispatch, dispatched.reason) == ("payments", 1, "started")  # type: ignore[attr-defined]


def test_a_redelivered_trigger_dispatches_nothing_more() -> None:
    s = started().given(c.DispatchRun(run_id=RUN, reason="started", cause=2))
    s.when(c.DispatchRun(run_id=RUN, reason="started", cause=2)).then_events([])
    s.when(c.DispatchRun(run_id=RUN, reason="timer", cause=1)).then_events([])


def test_a_worker_holding_an_older_dispatch_cannot_start_the_next_step() -> None:
    s = started().given(
        c.DispatchRun(run_id=RUN, reason="started", cause=2),
        c.DispatchRun(run_id=RUN, reason="handed off", cause=3),
    )
    s.when(c.StartStep(run_id=RUN, step="charge", attempt=1, dispatch=1))
    s.then_error(SupersededError)
    s.when(c.StartStep(run_id=RUN, step="charge", attempt=1, dispatch=2))
    s.then_events(["StepStarted"])


def test_an_ended_run_is_not_dispatched() -> None:
    s = started().given(c.CompleteRun(run_id=RUN, output=1))
    s.when(c.DispatchRun(run_id=RUN, reason="late", cause=9)).then_error(RunNotActiveError)


def test_loading_a_run_gives_the_state_a_worker_replays_from() -> None:
    s = started().given(
        c.DispatchRun(run_id=RUN, reason="started", cause=2),
        c.StartStep(run_id=RUN, step="charge", attempt=1, dispatch=1),
        c.CompleteStep(run_id=RUN, step="charge", attempt=1, output={"id": 7}),
        c.StartSleep(run_id=RUN, name="nap", seconds=60),
    )
    reply = s.app.handle(c.LoadRun(run_id=RUN))
    assert isinstance(reply, RunLoaded)
    run = reply.run
    assert (run["input"], run["dispatch"], run["status"]) == ({"n": 1}, 1, "sleeping")
    charge = run["steps"]["charge"]
    assert (charge["status"], charge["output"], charge["attempts"]) == ("completed", {"id": 7}, 1)
    assert run["sleeps"]["nap"]["fired"] is False


def test_a_stale_worker_is_told_why_in_a_stable_form() -> None:
    from infrastructure.nats.command_service import reply_body

    s = started().given(
        c.DispatchRun(run_id=RUN, reason="started", cause=2),
        c.DispatchRun(run_id=RUN, reason="handed off", cause=3),
    )
    [refused] = s.app.execute([c.StartStep(run_id=RUN, step="charge", attempt=1, dispatch=1)])
    body = reply_body(refused)
    assert body["error"] == {
        "code": "invalid_state",
        "message": str(refused),
        "details": [{"reason": "superseded"}],
    }


# ------------------------------------------------------------ hand-off at start (ADR 13)
def test_a_run_of_an_unlimited_workflow_is_handed_off_in_its_starts_transaction() -> None:
    s = Scenario().given(c.RegisterWorkflow(name="orders", queue="payments"))
    s.when(c.StartRun(workflow="orders", key="o-1")).then_events(["RunStarted", "TaskDispatched"])
    started = s.event(WorkflowRun.RunStarted)
    dispatched = s.event(WorkflowRun.TaskDispatched)
    assert started.dispatched is True
    assert (dispatched.queue, dispatched.dispatch, dispatched.reason) == ("payments", 1, "start")
    assert s.reply is not None and s.reply.position == s.head()
    s.when(c.StartStep(run_id=RUN, step="charge", attempt=1, dispatch=1))
    s.then_events(["StepStarted"])


def test_the_schedulers_start_dispatch_of_a_run_handed_off_at_start_changes_nothing() -> None:
    """A scheduler from before ADR 13 still dispatches every start: a no-op now."""
    s = Scenario().given(
        c.RegisterWorkflow(name="orders", queue="payments"),
        c.StartRun(workflow="orders", key="o-1"),
    )
    s.when(c.DispatchRun(run_id=RUN, reason="start", cause=2)).then_events([])
    s.when(c.DispatchRun(run_id=RUN, reason="timer", cause=3)).then_events(["TaskDispatched"])
    assert s.event(WorkflowRun.TaskDispatched).dispatch == 2


def test_a_limited_workflows_run_waits_for_the_scheduler() -> None:
    s = Scenario().given(c.RegisterWorkflow(name="orders", concurrency=Concurrency(limit=1)))
    s.when(c.StartRun(workflow="orders", key="o-1")).then_events(["RunStarted"])
    assert s.event(WorkflowRun.RunStarted).dispatched is False


def test_children_and_triggered_runs_are_handed_off_at_start_too() -> None:
    s = Scenario().given(
        c.RegisterWorkflow(name="orders", queue="payments"),
        c.RegisterWorkflow(name="invoices", queue="billing", triggers=["order.placed"]),
        c.StartRun(workflow="orders", key="o-1"),
    )
    s.when(c.StartChild(run_id=RUN, name="invoice", workflow="invoices"))
    s.then_events(["ChildStarted", "RunStarted", "TaskDispatched"])
    assert s.event(WorkflowRun.TaskDispatched).queue == "billing"
    event_id = s.app.send_event(c.SendEvent(name="order.placed", data={})).event_id
    s.when(c.TriggerRun(event_id=event_id, workflow="invoices"))
    s.then_events(["RunTriggered", "RunStarted", "TaskDispatched"])


def test_a_run_started_before_adr_13_reads_as_not_dispatched() -> None:
    state: dict[str, Any] = {"workflow": "orders", "key": None, "input": None}
    WorkflowRun.RunStarted.upcast_v1_v2(state)
    assert state["dispatched"] is False


# ------------------------------------------------------------------ eager start (ADR 17)
def eagerly_started() -> Scenario:
    return Scenario().given(
        c.RegisterWorkflow(name="orders", queue="payments"),
        c.StartRun(workflow="orders", key="o-1", input={"n": 1}, eager=True),
    )


def test_an_eager_start_hands_the_run_to_its_starter_and_replies_with_the_run() -> None:
    s = Scenario().given(c.RegisterWorkflow(name="orders", queue="payments"))
    s.when(c.StartRun(workflow="orders", key="o-1", input={"n": 1}, eager=True))
    s.then_events(["RunStarted", "TaskDispatched"])
    dispatched = s.event(WorkflowRun.TaskDispatched)
    assert (dispatched.reason, dispatched.dispatch, dispatched.queue) == ("eager", 1, "payments")
    assert isinstance(s.reply, RunStartedReply) and s.reply.run is not None
    assert (s.reply.run["input"], s.reply.run["dispatch"]) == ({"n": 1}, 1)
    assert s.reply.to_json()["run"] == s.reply.run
    s.when(c.StartStep(run_id=RUN, step="charge", attempt=1, dispatch=1))
    s.then_events(["StepStarted"])


def test_a_plain_starts_reply_carries_no_run() -> None:
    s = Scenario().given(c.RegisterWorkflow(name="orders"))
    s.when(c.StartRun(workflow="orders", key="o-1"))
    assert isinstance(s.reply, RunStartedReply) and "run" not in s.reply.to_json()


def test_an_eager_start_of_a_run_that_exists_or_of_a_limited_workflow_is_a_plain_one() -> None:
    s = eagerly_started()
    s.when(c.StartRun(workflow="orders", key="o-1", eager=True)).then_events([])
    assert isinstance(s.reply, RunStartedReply) and s.reply.run is None
    limited = Scenario().given(c.RegisterWorkflow(name="orders", concurrency=Concurrency(limit=1)))
    limited.when(c.StartRun(workflow="orders", key="o-1", eager=True))
    limited.then_events(["RunStarted"])
    assert isinstance(limited.reply, RunStartedReply) and limited.reply.run is None


def test_a_repeated_eager_start_command_never_hands_the_run_out_twice() -> None:
    s = Scenario().given(c.RegisterWorkflow(name="orders"))
    [first] = s.app.execute(
        [c.StartRun(workflow="orders", key="o-1", eager=True, command_id="start-1")]
    )
    [repeat] = s.app.execute(
        [c.StartRun(workflow="orders", key="o-1", eager=True, command_id="start-1")]
    )
    assert isinstance(first, RunStartedReply) and isinstance(repeat, RunStartedReply)
    assert repeat.run is None and repeat.run_id == first.run_id


def test_a_command_id_repeated_in_the_same_batch_never_hands_the_run_out_twice() -> None:
    s = Scenario().given(c.RegisterWorkflow(name="orders"))
    start = c.StartRun(workflow="orders", key="o-1", eager=True, command_id="start-2")
    first, repeat = s.app.execute([start, start])
    assert isinstance(first, RunStartedReply) and isinstance(repeat, RunStartedReply)
    assert first.run is not None and repeat.run is None
    assert (repeat.run_id, repeat.position) == (first.run_id, first.position)


# ---------------------------------------------------- an eager start's first step (ADR 20)
def test_an_eager_start_records_its_first_step_under_the_eager_hand_off() -> None:
    s = Scenario().given(c.RegisterWorkflow(name="orders", queue="payments"))
    retry = RetryPolicy(max_attempts=2)
    first = c.FirstStep(step="charge", retry_policy=retry)
    s.when(c.StartRun(workflow="orders", key="o-1", input={"n": 1}, eager=True, first_step=first))
    s.then_events(["RunStarted", "TaskDispatched", "StepStarted"])
    started = s.event(WorkflowRun.StepStarted)
    assert (started.step, started.attempt) == ("charge", 1)
    assert isinstance(s.reply, RunStartedReply) and s.reply.run is not None
    assert s.reply.run["status"] == "running"
    step = s.reply.run["steps"]["charge"]
    assert (step["status"], step["attempts"]) == ("running", 1)
    assert s.reply.position == s.head()  # the reply's hand-off position covers the step
    # The worker runs that attempt: a start of it repeated changes nothing.
    s.when(c.StartStep(run_id=RUN, step="charge", attempt=1, dispatch=1)).then_events([])
    s.when(c.CompleteStep(run_id=RUN, step="charge", attempt=1, output=1))
    s.then_events(["StepCompleted"])
    assert started.retry_policy == retry.to_json()


def test_a_first_step_is_ignored_where_the_start_is_not_eager_after_all() -> None:
    first = c.FirstStep(step="charge")
    s = eagerly_started()
    s.when(c.StartRun(workflow="orders", key="o-1", eager=True, first_step=first))
    s.then_events([])
    limited = Scenario().given(c.RegisterWorkflow(name="orders", concurrency=Concurrency(limit=1)))
    limited.when(c.StartRun(workflow="orders", key="o-1", eager=True, first_step=first))
    limited.then_events(["RunStarted"])


def test_a_first_step_without_eager_or_with_a_bad_name_is_refused_and_starts_nothing() -> None:
    with pytest.raises(ValidationError, match="first_step needs eager"):
        c.StartRun(workflow="orders", first_step=c.FirstStep(step="charge"))
    s = Scenario().given(c.RegisterWorkflow(name="orders"))
    bad = c.FirstStep(step="charge\x00")
    s.when(c.StartRun(workflow="orders", key="o-1", eager=True, first_step=bad))
    s.then_error(InvalidCommandError)
    s.when(c.StartRun(workflow="orders", key="o-1", eager=True))  # nothing was left behind
    s.then_events(["RunStarted", "TaskDispatched"])


def test_a_runs_end_says_whether_it_completed_the_run() -> None:
    s = eagerly_started()
    s.when(c.CompleteRun(run_id=RUN, output=1))
    assert isinstance(s.reply, RunCompletedReply) and s.reply.completed_now is True
    s.when(c.CompleteRun(run_id=RUN, output=2)).then_events([])
    assert isinstance(s.reply, RunCompletedReply) and s.reply.completed_now is False


def test_an_expired_eager_hand_off_goes_to_the_queue_and_fences_its_holder() -> None:
    s = eagerly_started()
    s.when(c.DispatchRun(run_id=RUN, reason="eager_expired", cause=2))
    s.then_events(["TaskDispatched"])
    assert s.event(WorkflowRun.TaskDispatched).dispatch == 2
    s.when(c.StartStep(run_id=RUN, step="charge", attempt=1, dispatch=1))
    s.then_error(SupersededError)
    s.when(c.DispatchRun(run_id=RUN, reason="eager_expired", cause=5)).then_events([])


def test_an_eager_run_that_moved_on_is_not_taken_from_anyone() -> None:
    sleeping = eagerly_started().given(
        c.StartStep(run_id=RUN, step="charge", attempt=1, dispatch=1),
        c.CompleteStep(run_id=RUN, step="charge", attempt=1, output=None),
        c.StartSleep(run_id=RUN, name="nap", seconds=60),
    )
    sleeping.when(c.DispatchRun(run_id=RUN, reason="eager_expired", cause=9)).then_events([])
    redispatched = eagerly_started().given(c.DispatchRun(run_id=RUN, reason="timer", cause=3))
    redispatched.when(c.DispatchRun(run_id=RUN, reason="eager_expired", cause=9))
    redispatched.then_events([])


def test_only_a_start_hands_a_run_off_eagerly() -> None:
    s = started()
    s.when(c.DispatchRun(run_id=RUN, reason="eager", cause=3)).then_error(InvalidCommandError)
