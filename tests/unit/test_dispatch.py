"""Handing a run to a worker: one dispatch per cause, and stale workers fenced off."""

from __future__ import annotations

from domain.errors import RunNotActiveError, SupersededError
from domain.ids import run_id_for
from services import commands as c
from services.workflow_runs import RunLoaded
from tests.unit.scenario import Scenario

RUN = run_id_for("orders", "o-1")


def started() -> Scenario:
    return Scenario().given(
        c.RegisterWorkflow(name="orders", queue="payments"),
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
