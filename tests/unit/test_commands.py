"""Every WorkflowRuns command handler: given commands, when a command, then events or an error."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from domain.errors import (
    AttemptMismatchError,
    DomainError,
    EventNotFoundError,
    InvalidCommandError,
    InvalidStateError,
    NotPendingError,
    RetriesExhaustedError,
    RunNotActiveError,
    RunNotFoundError,
    StepAlreadyCompletedError,
    StepNotFoundError,
    StepsPendingError,
    UnknownWorkflowError,
)
from domain.ids import child_run_id, inbound_event_id, run_id_for, sent_event_id
from domain.inbound_event import InboundEvent
from domain.values import RetryPolicy, Timeouts
from domain.workflow_run import RunStatus, StepStatus, WorkflowRun
from domain.workflow_type import WorkflowType
from services import commands as c
from services.workflow_runs import COMMANDS, EventSentReply, RunStartedReply
from tests.unit.scenario import Scenario

WORKFLOW = "orders"
KEY = "order-1"
RUN = run_id_for(WORKFLOW, KEY)
UNKNOWN_RUN = run_id_for(WORKFLOW, "never-started")


# ------------------------------------------------------------------------------- helpers
def register(
    name: str = WORKFLOW, retry_policy: RetryPolicy | None = None, **fields: Any
) -> c.RegisterWorkflow:
    return c.RegisterWorkflow(name=name, retry_policy=retry_policy, **fields)


def start(key: str | None = KEY, workflow: str = WORKFLOW, **fields: Any) -> c.StartRun:
    return c.StartRun(workflow=workflow, key=key, **fields)


def step(name: str = "charge", attempt: int = 1, **fields: Any) -> c.StartStep:
    return c.StartStep(run_id=RUN, step=name, attempt=attempt, **fields)


def complete(
    name: str = "charge", attempt: int = 1, output: Any = None, compensable: bool = False
) -> c.CompleteStep:
    return c.CompleteStep(
        run_id=RUN, step=name, attempt=attempt, output=output, compensable=compensable
    )


def fail(
    name: str = "charge", attempt: int = 1, error_type: str = "Boom", retryable: bool = True
) -> c.FailStep:
    error = c.StepError(type=error_type, message="card declined")
    return c.FailStep(run_id=RUN, step=name, attempt=attempt, error=error, retryable=retryable)


def fail_run(error_type: str = "OrderRejected") -> c.FailRun:
    return c.FailRun(run_id=RUN, error=c.StepError(type=error_type, message="no stock"))


def compensate(name: str) -> c.CompensateStep:
    return c.CompensateStep(run_id=RUN, step=name)


def started(retry_policy: RetryPolicy | None = None) -> Scenario:
    """A registered workflow and one queued run of it (id ``RUN``)."""
    return Scenario().given(register(retry_policy=retry_policy), start())


def with_completed_compensable_steps(*names: str) -> Scenario:
    """A run whose steps ``names`` completed in that order, each with a compensation."""
    s = started()
    for name in names:
        s.given(step(name), complete(name, compensable=True))
    return s


def status(s: Scenario) -> RunStatus:
    return s.run(RUN).status


# ------------------------------------------------------------------------ the handler map
def test_every_command_has_a_handler() -> None:
    concrete = {
        cls
        for cls in vars(c).values()
        if isinstance(cls, type)
        and issubclass(cls, c.Command)
        and cls not in (c.Command, c.RunCommand)
    }
    assert concrete == set(COMMANDS.values())


# ----------------------------------------------------------------------------- start_run
def test_starting_a_run_records_run_started_and_queues_the_run() -> None:
    s = Scenario().given(register())
    s.when(start(input={"order_id": 7})).then_events(["RunStarted", "TaskDispatched"])
    assert s.reply == RunStartedReply(position=s.head(), run_id=RUN, created=True)
    run = s.run(RUN)
    assert (run.status, run.workflow, run.key, run.input) == (
        RunStatus.QUEUED,
        WORKFLOW,
        KEY,
        {"order_id": 7},
    )


def test_starting_with_the_same_key_again_returns_the_same_run_and_appends_nothing() -> None:
    s = started()
    s.when(start(input={"other": "input"})).then_events([])
    assert s.reply == RunStartedReply(position=s.head(), run_id=RUN, created=False)
    assert s.run(RUN).input is None


def test_starting_without_a_key_makes_a_new_run_each_time() -> None:
    s = Scenario().given(register())
    first = s.apply(start(key=None))
    second = s.apply(start(key=None))
    assert isinstance(first, RunStartedReply) and isinstance(second, RunStartedReply)
    assert first.run_id != second.run_id
    assert first.created and second.created


def test_the_same_key_in_another_workflow_starts_another_run() -> None:
    s = started().given(register("invoices"))
    s.when(start(workflow="invoices")).then_events(["RunStarted", "TaskDispatched"])
    assert isinstance(s.reply, RunStartedReply)
    assert s.reply.run_id == run_id_for("invoices", KEY) != RUN


def test_starting_an_unregistered_workflow_is_refused_as_unknown() -> None:
    s = Scenario().given(register())
    s.when(start(workflow="payments")).then_error(UnknownWorkflowError)


def test_starting_a_workflow_with_a_malformed_name_is_refused_as_invalid_command() -> None:
    # No workflow can ever be registered under such a name: the request itself is malformed.
    s = Scenario().given(register())
    s.when(start(workflow="no spaces allowed!")).then_error(InvalidCommandError)


def test_a_run_takes_its_retry_policy_and_timeouts_from_its_workflow() -> None:
    policy = RetryPolicy(max_attempts=5, initial_interval=2.0)
    timeouts = Timeouts(run=3600.0, step=60.0)
    s = Scenario().given(register(retry_policy=policy, timeouts=timeouts), start())
    run = s.run(RUN)
    assert (run.retry_policy, run.timeouts) == (policy, timeouts)


# ---------------------------------------------------------------------------- send_event
def test_sending_an_event_records_it_under_an_id_derived_from_the_senders_id() -> None:
    s = Scenario()
    s.when(c.SendEvent(name="order.placed", data={"order_id": 7}, id="evt-1"))
    s.then_events(["Received"])
    assert s.reply == EventSentReply(
        position=s.head(), event_id=inbound_event_id("evt-1"), created=True
    )
    received = s.event(InboundEvent.Received)
    assert (received.name, received.data, received.external_id, received.sent_by_run) == (
        "order.placed",
        {"order_id": 7},
        "evt-1",
        None,
    )


def test_sending_the_same_event_id_twice_records_one_event() -> None:
    send = c.SendEvent(name="order.placed", data={"order_id": 7}, id="evt-1")
    s = Scenario().given(send)
    s.when(send).then_events([])
    assert s.reply == EventSentReply(
        position=s.head(), event_id=inbound_event_id("evt-1"), created=False
    )


def test_events_sent_without_an_id_are_each_recorded() -> None:
    s = Scenario().given(c.SendEvent(name="order.placed"))
    s.when(c.SendEvent(name="order.placed")).then_events(["Received"])


def test_sending_an_event_with_a_malformed_name_is_refused() -> None:
    Scenario().when(c.SendEvent(name="order placed!")).then_error(InvalidCommandError)


# ---------------------------------------------------------------------------- cancel_run
def test_cancelling_an_idle_run_cancels_it_at_once() -> None:
    s = started()
    s.when(c.CancelRun(run_id=RUN, reason="customer asked"))
    s.then_events(["CancelRequested", "RunCancelled"])
    assert s.event(WorkflowRun.RunCancelled).reason == "customer asked"
    assert status(s) is RunStatus.CANCELLED


def test_cancelling_a_sleeping_run_cancels_it_at_once() -> None:
    s = started().given(c.StartSleep(run_id=RUN, name="cool-off", seconds=600))
    s.when(c.CancelRun(run_id=RUN)).then_events(["CancelRequested", "RunCancelled"])


def test_cancelling_a_run_with_a_step_in_flight_waits_for_the_step() -> None:
    s = started().given(step())
    s.when(c.CancelRun(run_id=RUN)).then_events(["CancelRequested"])
    run = s.run(RUN)
    assert run.cancel_requested
    assert run.status is RunStatus.RUNNING


def test_completing_the_step_in_flight_finishes_the_cancel() -> None:
    s = started().given(step(), c.CancelRun(run_id=RUN, reason="changed my mind"))
    s.when(complete()).then_events(["StepCompleted", "RunCancelled"])
    assert s.event(WorkflowRun.RunCancelled).reason == "changed my mind"
    assert status(s) is RunStatus.CANCELLED


def test_a_failed_attempt_of_a_run_being_cancelled_is_not_retried() -> None:
    s = started().given(step(), c.CancelRun(run_id=RUN))
    s.when(fail()).then_events(["StepFailed", "RunCancelled"])


def test_no_new_step_starts_while_a_cancel_is_pending() -> None:
    s = started().given(step(), c.CancelRun(run_id=RUN))
    s.when(step("ship")).then_error(InvalidStateError)


def test_cancelling_a_run_with_a_completed_compensable_step_compensates_it_first() -> None:
    s = with_completed_compensable_steps("charge")
    s.when(c.CancelRun(run_id=RUN)).then_events(["CancelRequested", "CompensationStarted"])
    compensation = s.event(WorkflowRun.CompensationStarted)
    assert (compensation.reason, compensation.steps, compensation.error) == (
        "cancelled",
        ["charge"],
        None,
    )
    assert status(s) is RunStatus.COMPENSATING


def test_compensating_the_last_step_of_a_cancelled_run_cancels_it() -> None:
    s = with_completed_compensable_steps("charge").given(c.CancelRun(run_id=RUN))
    s.when(compensate("charge")).then_events(["StepCompensated", "RunCancelled"])
    assert status(s) is RunStatus.CANCELLED
    assert s.run(RUN).steps["charge"].status is StepStatus.COMPENSATED


def test_cancelling_twice_is_cancelling_once() -> None:
    s = started().given(c.CancelRun(run_id=RUN))
    s.when(c.CancelRun(run_id=RUN)).then_events([])


def test_cancelling_twice_while_a_step_is_in_flight_appends_nothing_more() -> None:
    s = started().given(step(), c.CancelRun(run_id=RUN))
    s.when(c.CancelRun(run_id=RUN)).then_events([])


def test_cancelling_a_completed_run_is_refused() -> None:
    s = started().given(c.CompleteRun(run_id=RUN, output=1))
    error = s.when(c.CancelRun(run_id=RUN)).then_error(RunNotActiveError)
    assert isinstance(error, RunNotActiveError) and error.status == RunStatus.COMPLETED


def test_cancelling_an_unknown_run_is_refused_as_not_found() -> None:
    s = started()
    s.when(c.CancelRun(run_id=UNKNOWN_RUN)).then_error(RunNotFoundError)


# ----------------------------------------------------------------------------- retry_run
def exhausted_and_failed() -> Scenario:
    """Step 'charge' used both of its 2 attempts, and the run failed."""
    s = started(RetryPolicy(max_attempts=2))
    return s.given(step(), fail(), step(attempt=2), fail(attempt=2), fail_run())


def test_retrying_a_failed_run_queues_it_again() -> None:
    s = exhausted_and_failed()
    s.when(c.RetryRun(run_id=RUN)).then_events(["RunRetried"])
    run = s.run(RUN)
    assert (run.status, run.error) == (RunStatus.QUEUED, None)
    assert run.steps["charge"].status is StepStatus.PENDING


def test_a_retried_run_resumes_its_failed_step_at_the_next_attempt_number() -> None:
    s = exhausted_and_failed().given(c.RetryRun(run_id=RUN))
    s.when(step(attempt=3)).then_events(["StepStarted"])
    assert s.event(WorkflowRun.StepStarted).attempt == 3
    assert status(s) is RunStatus.RUNNING


def test_a_retried_step_does_not_restart_from_attempt_one() -> None:
    s = exhausted_and_failed().given(c.RetryRun(run_id=RUN))
    s.when(step(attempt=1)).then_error(AttemptMismatchError)


def test_a_retried_step_gets_a_fresh_attempt_budget_and_backoff() -> None:
    s = exhausted_and_failed().given(c.RetryRun(run_id=RUN), step(attempt=3))
    s.when(fail(attempt=3)).then_events(["StepFailed", "RetryScheduled"])
    scheduled = s.event(WorkflowRun.RetryScheduled)
    assert (scheduled.attempt, scheduled.delay) == (4, 1.0)
    s.given(step(attempt=4))
    s.when(fail(attempt=4)).then_events(["StepFailed"])


def test_retrying_keeps_completed_steps_memoised() -> None:
    s = started().given(step("reserve"), complete("reserve", output="r-1"))
    s.given(step(), fail(retryable=False), fail_run(), c.RetryRun(run_id=RUN))
    s.when(step("reserve", attempt=2)).then_error(StepAlreadyCompletedError)
    assert s.run(RUN).steps["reserve"].output == "r-1"


def test_retrying_runs_compensated_steps_again() -> None:
    s = with_completed_compensable_steps("charge").given(fail_run(), compensate("charge"))
    s.given(c.RetryRun(run_id=RUN))
    s.when(step(attempt=2)).then_events(["StepStarted"])


def test_retrying_a_running_run_is_refused() -> None:
    s = started().given(step())
    s.when(c.RetryRun(run_id=RUN)).then_error(InvalidStateError)


def test_retrying_a_cancelled_run_is_refused() -> None:
    s = started().given(c.CancelRun(run_id=RUN))
    s.when(c.RetryRun(run_id=RUN)).then_error(InvalidStateError)


def test_retrying_an_unknown_run_is_refused_as_not_found() -> None:
    Scenario().when(c.RetryRun(run_id=UNKNOWN_RUN)).then_error(RunNotFoundError)


# --------------------------------------------------------------------- register_workflow
def workflow_type(s: Scenario, name: str = WORKFLOW) -> WorkflowType:
    return s.app.get_workflow_type(name)


def test_registering_a_new_workflow_records_it() -> None:
    s = Scenario()
    s.when(register(triggers=["order.placed"])).then_events(["Registered"])
    assert workflow_type(s).triggers == ["order.placed"]
    assert s.reply is not None and s.reply.position == s.head()


def test_registering_from_a_worker_records_the_worker_too() -> None:
    s = Scenario()
    s.when(register(worker_id="worker-1")).then_events(["Registered", "WorkerJoined"])
    assert s.event(WorkflowType.WorkerJoined).worker_id == "worker-1"
    assert workflow_type(s).workers == {"worker-1"}


def test_registering_the_same_definition_again_appends_nothing() -> None:
    s = Scenario().given(register(triggers=["a", "b"], worker_id="worker-1"))
    s.when(register(triggers=["b", "a", "a"], worker_id="worker-1")).then_events([])


def test_another_worker_registering_the_same_definition_only_joins() -> None:
    s = Scenario().given(register(worker_id="worker-1"))
    s.when(register(worker_id="worker-2")).then_events(["WorkerJoined"])
    assert workflow_type(s).workers == {"worker-1", "worker-2"}


def test_registering_changed_triggers_records_the_new_definition() -> None:
    s = Scenario().given(register(triggers=["order.placed"]))
    s.when(register(triggers=["order.placed", "order.updated"]))
    s.then_events(["DefinitionChanged"])
    assert workflow_type(s).triggers == ["order.placed", "order.updated"]


def test_new_runs_take_the_changed_retry_policy() -> None:
    s = Scenario().given(register(), register(retry_policy=RetryPolicy(max_attempts=9)))
    s.given(start())
    assert s.run(RUN).retry_policy.max_attempts == 9


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(register(name="no spaces!"), id="name"),
        pytest.param(register(triggers=["order placed!"]), id="trigger"),
        pytest.param(register(queue="a queue"), id="queue"),
    ],
)
def test_registering_a_malformed_workflow_is_refused(command: c.RegisterWorkflow) -> None:
    Scenario().when(command).then_error(InvalidCommandError)


# ---------------------------------------------------------------------------- start_step
def test_starting_the_first_attempt_of_a_step_records_it_and_the_run_runs() -> None:
    s = started()
    s.when(step()).then_events(["StepStarted"])
    assert s.event(WorkflowRun.StepStarted).attempt == 1
    run = s.run(RUN)
    assert run.status is RunStatus.RUNNING
    assert (run.steps["charge"].status, run.steps["charge"].attempts) == (StepStatus.RUNNING, 1)


def test_a_redelivered_step_start_appends_nothing() -> None:
    s = started().given(step())
    s.when(step()).then_events([])


def test_starting_a_step_at_the_wrong_attempt_number_is_refused() -> None:
    s = started()
    s.when(step(attempt=2)).then_error(AttemptMismatchError)


def test_skipping_an_attempt_number_after_a_failure_is_refused() -> None:
    s = started().given(step(), fail())
    s.when(step(attempt=3)).then_error(AttemptMismatchError)


def test_starting_an_attempt_beyond_max_attempts_is_refused() -> None:
    # The only attempt's worker died without reporting; a new attempt would be the second.
    s = started(RetryPolicy(max_attempts=1)).given(step())
    s.when(step(attempt=2)).then_error(RetriesExhaustedError)


def test_a_step_that_failed_for_good_does_not_start_again() -> None:
    s = started(RetryPolicy(max_attempts=2)).given(step(), fail(), step(attempt=2))
    s.given(fail(attempt=2))
    s.when(step(attempt=3)).then_error(InvalidStateError)


def test_a_completed_step_never_starts_a_new_attempt() -> None:
    s = started().given(step(), complete())
    s.when(step(attempt=2)).then_error(StepAlreadyCompletedError)


def test_a_repeated_start_of_a_completed_step_appends_nothing() -> None:
    s = started().given(step(), complete())
    s.when(step()).then_events([])


def test_a_step_with_a_blank_name_is_refused() -> None:
    s = started()
    s.when(step("   ")).then_error(InvalidCommandError)


def test_a_steps_own_retry_policy_overrides_the_runs() -> None:
    s = started(RetryPolicy(max_attempts=5)).given(step(retry_policy=RetryPolicy(max_attempts=1)))
    s.when(fail()).then_events(["StepFailed"])


def test_starting_a_step_of_an_ended_run_is_refused() -> None:
    s = started().given(c.CompleteRun(run_id=RUN))
    s.when(step()).then_error(RunNotActiveError)


def test_starting_a_step_of_an_unknown_run_is_refused_as_not_found() -> None:
    s = started()
    s.when(c.StartStep(run_id=UNKNOWN_RUN, step="charge", attempt=1)).then_error(RunNotFoundError)


# ------------------------------------------------------------------------- complete_step
def test_completing_a_step_records_its_output() -> None:
    s = started().given(step())
    s.when(complete(output={"charge_id": "ch_1"})).then_events(["StepCompleted"])
    assert s.event(WorkflowRun.StepCompleted).output == {"charge_id": "ch_1"}
    state = s.run(RUN).steps["charge"]
    assert (state.status, state.output) == (StepStatus.COMPLETED, {"charge_id": "ch_1"})


def test_a_second_completion_of_the_same_attempt_appends_nothing_and_the_first_stands() -> None:
    s = started().given(step(), complete(output="first"))
    s.when(complete(output="second")).then_events([])
    assert s.run(RUN).steps["charge"].output == "first"


def test_completing_a_step_that_never_started_is_refused() -> None:
    s = started()
    s.when(complete()).then_error(StepNotFoundError)


def test_completing_an_attempt_that_never_started_is_refused() -> None:
    s = started().given(step())
    s.when(complete(attempt=2)).then_error(AttemptMismatchError)


def test_completing_a_step_of_an_ended_run_is_refused() -> None:
    s = started().given(step(), fail_run())
    s.when(complete()).then_error(RunNotActiveError)


# ----------------------------------------------------------------------------- fail_step
def test_a_failed_attempt_with_attempts_left_schedules_a_retry_after_the_backoff() -> None:
    s = started().given(step())
    s.clock.advance(timedelta(minutes=5))
    s.when(fail()).then_events(["StepFailed", "RetryScheduled"])
    scheduled = s.event(WorkflowRun.RetryScheduled)
    assert (scheduled.step, scheduled.attempt, scheduled.delay) == ("charge", 2, 1.0)
    assert scheduled.due_at == s.clock.now() + timedelta(seconds=1)
    state = s.run(RUN).steps["charge"]
    assert (state.status, state.retry_due_at) == (StepStatus.RETRYING, scheduled.due_at)
    assert status(s) is RunStatus.RUNNING


def test_the_second_retry_waits_twice_as_long() -> None:
    s = started().given(step(), fail(), step(attempt=2))
    s.when(fail(attempt=2)).then_events(["StepFailed", "RetryScheduled"])
    scheduled = s.event(WorkflowRun.RetryScheduled)
    assert (scheduled.attempt, scheduled.delay) == (3, 2.0)
    assert scheduled.due_at == s.clock.now() + timedelta(seconds=2)


def test_a_failed_last_attempt_fails_the_step_for_good() -> None:
    s = started(RetryPolicy(max_attempts=2)).given(step(), fail(), step(attempt=2))
    s.when(fail(attempt=2)).then_events(["StepFailed"])
    assert s.run(RUN).steps["charge"].status is StepStatus.FAILED


def test_a_failure_flagged_non_retryable_is_not_retried() -> None:
    s = started().given(step())
    s.when(fail(retryable=False)).then_events(["StepFailed"])


def test_an_error_type_the_policy_lists_as_non_retryable_is_not_retried() -> None:
    policy = RetryPolicy(non_retryable_error_types=("CardDeclined",))
    s = started(policy).given(step())
    s.when(fail(error_type="CardDeclined")).then_events(["StepFailed"])


def test_an_error_type_the_policy_does_not_list_is_retried() -> None:
    policy = RetryPolicy(non_retryable_error_types=("CardDeclined",))
    s = started(policy).given(step())
    s.when(fail(error_type="GatewayTimeout")).then_events(["StepFailed", "RetryScheduled"])


def test_a_duplicate_failure_appends_nothing() -> None:
    s = started().given(step(), fail())
    s.when(fail()).then_events([])


def test_a_stale_failure_of_a_replaced_attempt_appends_nothing() -> None:
    s = started().given(step(), fail(), step(attempt=2))
    s.when(fail(attempt=1)).then_events([])
    assert s.run(RUN).steps["charge"].status is StepStatus.RUNNING


def test_a_failure_keeps_the_error_details() -> None:
    s = started().given(step())
    error = c.StepError.model_validate(
        {"type": "Boom", "message": "card declined", "traceback": "line 1"}
    )
    s.when(c.FailStep(run_id=RUN, step="charge", attempt=1, error=error))
    assert s.event(WorkflowRun.StepFailed).error == {
        "type": "Boom",
        "message": "card declined",
        "traceback": "line 1",
    }


def test_failing_a_step_that_never_started_is_refused() -> None:
    s = started()
    s.when(fail()).then_error(StepNotFoundError)


# --------------------------------------------------------------------------- start_sleep
def test_sleeping_for_seconds_wakes_that_long_after_now() -> None:
    s = started()
    s.when(c.StartSleep(run_id=RUN, name="cool-off", seconds=600)).then_events(["SleepStarted"])
    assert s.event(WorkflowRun.SleepStarted).wake_at == s.clock.now() + timedelta(minutes=10)
    assert status(s) is RunStatus.SLEEPING


def test_sleeping_until_a_time_wakes_then() -> None:
    until = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    s = started()
    s.when(c.StartSleep(run_id=RUN, name="cool-off", until=until)).then_events(["SleepStarted"])
    assert s.event(WorkflowRun.SleepStarted).wake_at == until
    assert status(s) is RunStatus.SLEEPING


def test_a_repeated_sleep_keeps_its_first_wake_up_time() -> None:
    s = started().given(c.StartSleep(run_id=RUN, name="cool-off", seconds=600))
    first = s.run(RUN).sleeps["cool-off"].wake_at
    s.clock.advance(timedelta(minutes=3))
    s.when(c.StartSleep(run_id=RUN, name="cool-off", seconds=600)).then_events([])
    assert s.run(RUN).sleeps["cool-off"].wake_at == first


def test_a_sleep_too_long_for_the_calendar_is_refused_with_a_structured_error() -> None:
    s = started()
    try:
        command = c.StartSleep(run_id=RUN, name="cool-off", seconds=1e15)
    except ValidationError:
        return  # refused at the edge, before the service: also a structured error
    s.when(command).then_error(InvalidCommandError)


# ---------------------------------------------------------------------------- fire_timer
def test_firing_a_timer_wakes_the_run() -> None:
    s = started().given(c.StartSleep(run_id=RUN, name="cool-off", seconds=600))
    s.when(c.FireTimer(run_id=RUN, name="cool-off")).then_events(["TimerFired"])
    assert status(s) is RunStatus.RUNNING


def test_a_timer_fires_once() -> None:
    s = started().given(c.StartSleep(run_id=RUN, name="cool-off", seconds=600))
    s.given(c.FireTimer(run_id=RUN, name="cool-off"))
    s.when(c.FireTimer(run_id=RUN, name="cool-off")).then_events([])


def test_firing_a_timer_that_was_never_set_is_refused() -> None:
    s = started()
    s.when(c.FireTimer(run_id=RUN, name="cool-off")).then_error(NotPendingError)


# -------------------------------------------------------------- start_wait / deliver_event
SHIPPED = "shipment.confirmed"
EVENT_ID = inbound_event_id("evt-1")


def waiting(timeout_seconds: float | None = None) -> Scenario:
    """The run waits for a shipment of order 7 (wait 'shipped')."""
    wait = c.StartWait(
        run_id=RUN,
        name="shipped",
        event_name=SHIPPED,
        match={"order_id": 7},
        timeout_seconds=timeout_seconds,
    )
    return started().given(wait)


def shipment(order_id: int, event_id: str = "evt-1") -> c.SendEvent:
    return c.SendEvent(name=SHIPPED, data={"order_id": order_id, "carrier": "DHL"}, id=event_id)


def deliver(event_id: str = "evt-1") -> c.DeliverEvent:
    return c.DeliverEvent(run_id=RUN, name="shipped", event_id=inbound_event_id(event_id))


def test_starting_a_wait_records_its_deadline_and_the_run_waits() -> None:
    s = started()
    s.clock.advance(timedelta(hours=1))
    wait = c.StartWait(run_id=RUN, name="shipped", event_name=SHIPPED, timeout_seconds=3600)
    s.when(wait).then_events(["WaitStarted"])
    assert s.event(WorkflowRun.WaitStarted).timeout_at == s.clock.now() + timedelta(hours=1)
    assert status(s) is RunStatus.WAITING


def test_a_wait_without_a_timeout_has_no_deadline() -> None:
    s = started()
    s.when(c.StartWait(run_id=RUN, name="shipped", event_name=SHIPPED))
    assert s.event(WorkflowRun.WaitStarted).timeout_at is None


def test_a_repeated_wait_appends_nothing() -> None:
    s = waiting()
    s.when(c.StartWait(run_id=RUN, name="shipped", event_name=SHIPPED)).then_events([])


def test_a_matching_event_wakes_the_run_and_records_that_it_did() -> None:
    s = waiting().given(shipment(order_id=7))
    s.when(deliver()).then_events(["EventReceived", "RunWoken"])
    received = s.event(WorkflowRun.EventReceived)
    assert (received.originator_id, received.event_id) == (RUN, EVENT_ID)
    assert received.data == {"order_id": 7, "carrier": "DHL"}
    woken = s.event(InboundEvent.RunWoken)
    assert (woken.originator_id, woken.run_id, woken.wait) == (EVENT_ID, RUN, "shipped")
    assert s.reply is not None and s.reply.position == s.head()
    assert status(s) is RunStatus.RUNNING


def test_an_event_that_does_not_match_is_refused_and_wakes_nothing() -> None:
    s = waiting().given(shipment(order_id=8))
    s.when(deliver()).then_error(InvalidStateError)
    assert status(s) is RunStatus.WAITING


def test_an_event_of_another_name_is_refused() -> None:
    s = waiting().given(c.SendEvent(name="order.placed", data={"order_id": 7}, id="evt-1"))
    s.when(deliver()).then_error(InvalidStateError)


def test_the_same_event_delivered_twice_appends_nothing() -> None:
    s = waiting().given(shipment(order_id=7), deliver())
    s.when(deliver()).then_events([])


def test_a_second_matching_event_after_the_first_appends_nothing() -> None:
    s = waiting().given(shipment(order_id=7), deliver(), shipment(order_id=7, event_id="evt-2"))
    s.when(deliver("evt-2")).then_events([])
    assert s.run(RUN).waits["shipped"].event_id == EVENT_ID


def test_an_event_after_the_wait_timed_out_appends_nothing() -> None:
    s = waiting(timeout_seconds=60).given(c.TimeOutWait(run_id=RUN, name="shipped"))
    s.given(shipment(order_id=7))
    s.when(deliver()).then_events([])
    assert s.run(RUN).waits["shipped"].outcome == "timed_out"


def test_delivering_an_event_that_was_never_sent_is_refused() -> None:
    s = waiting()
    s.when(deliver()).then_error(EventNotFoundError)


def test_delivering_to_a_wait_that_was_never_started_is_refused() -> None:
    s = started().given(shipment(order_id=7))
    s.when(deliver()).then_error(NotPendingError)


def test_a_wait_too_long_for_the_calendar_is_refused_with_a_structured_error() -> None:
    s = started()
    try:
        command = c.StartWait(run_id=RUN, name="shipped", event_name=SHIPPED, timeout_seconds=1e15)
    except ValidationError:
        return  # refused at the edge, before the service: also a structured error
    s.when(command).then_error(InvalidCommandError)


# ------------------------------------------------------------------------- time_out_wait
def test_timing_out_a_wait_resumes_the_run() -> None:
    s = waiting(timeout_seconds=60)
    s.when(c.TimeOutWait(run_id=RUN, name="shipped")).then_events(["WaitTimedOut"])
    assert s.run(RUN).waits["shipped"].outcome == "timed_out"
    assert status(s) is RunStatus.RUNNING


def test_timing_out_a_wait_twice_appends_nothing() -> None:
    s = waiting(timeout_seconds=60).given(c.TimeOutWait(run_id=RUN, name="shipped"))
    s.when(c.TimeOutWait(run_id=RUN, name="shipped")).then_events([])


def test_a_timeout_after_the_event_arrived_appends_nothing() -> None:
    s = waiting(timeout_seconds=60).given(shipment(order_id=7), deliver())
    s.when(c.TimeOutWait(run_id=RUN, name="shipped")).then_events([])
    assert s.run(RUN).waits["shipped"].outcome == "received"


def test_timing_out_a_wait_that_was_never_started_is_refused() -> None:
    s = started()
    s.when(c.TimeOutWait(run_id=RUN, name="shipped")).then_error(NotPendingError)


# --------------------------------------------------------------------------- start_child
CHILD = child_run_id(RUN, "invoice")


def start_child(workflow: str = "invoices") -> c.StartChild:
    return c.StartChild(run_id=RUN, name="invoice", workflow=workflow, input={"order_id": 7})


def with_child() -> Scenario:
    return started().given(register("invoices"), start_child())


def test_starting_a_child_records_it_on_the_parent_and_starts_the_child_run() -> None:
    s = started().given(register("invoices", retry_policy=RetryPolicy(max_attempts=7)))
    s.when(start_child()).then_events(["ChildStarted", "RunStarted", "TaskDispatched"])
    child_started = s.event(WorkflowRun.ChildStarted)
    assert (child_started.originator_id, child_started.child_run_id) == (RUN, CHILD)
    run_started = s.event(WorkflowRun.RunStarted)
    assert run_started.originator_id == CHILD
    assert (run_started.parent_run_id, run_started.parent_step) == (RUN, "invoice")
    assert (run_started.workflow, run_started.input) == ("invoices", {"order_id": 7})
    assert s.reply is not None and s.reply.position == s.head()
    assert status(s) is RunStatus.WAITING
    child = s.run(CHILD)
    assert (child.status, child.retry_policy.max_attempts) == (RunStatus.QUEUED, 7)


def test_starting_the_same_child_again_appends_nothing() -> None:
    s = with_child()
    s.when(start_child()).then_events([])


def test_starting_a_child_of_an_unregistered_workflow_is_refused() -> None:
    s = started()
    s.when(start_child("invoices")).then_error(UnknownWorkflowError)


def test_starting_a_child_of_an_unknown_parent_is_refused_as_not_found() -> None:
    s = started().given(register("invoices"))
    orphan = c.StartChild(run_id=UNKNOWN_RUN, name="invoice", workflow="invoices")
    s.when(orphan).then_error(RunNotFoundError)


# ------------------------------------------------------------------------- resolve_child
RESOLVE = c.ResolveChild(run_id=RUN, name="invoice")


def test_a_completed_child_resumes_its_parent_with_its_output() -> None:
    s = with_child().given(c.CompleteRun(run_id=CHILD, output={"invoice": "INV-1"}))
    s.when(RESOLVE).then_events(["ChildCompleted"])
    resolved = s.event(WorkflowRun.ChildCompleted)
    assert (resolved.child_run_id, resolved.output, resolved.error) == (
        CHILD,
        {"invoice": "INV-1"},
        None,
    )
    assert s.run(RUN).children["invoice"].outcome == "completed"
    assert status(s) is RunStatus.RUNNING


def test_a_failed_child_resumes_its_parent_with_its_error() -> None:
    child_error = c.StepError(type="TaxServiceDown", message="503")
    s = with_child().given(c.FailRun(run_id=CHILD, error=child_error))
    s.when(RESOLVE).then_events(["ChildCompleted"])
    resolved = s.event(WorkflowRun.ChildCompleted)
    assert resolved.error == {"type": "TaxServiceDown", "message": "503"}
    assert resolved.output is None
    assert s.run(RUN).children["invoice"].outcome == "failed"


def test_a_cancelled_child_resumes_its_parent_with_a_cancellation_error() -> None:
    s = with_child().given(c.CancelRun(run_id=CHILD))
    s.when(RESOLVE).then_events(["ChildCompleted"])
    error = s.event(WorkflowRun.ChildCompleted).error
    assert error is not None and error["type"] == "ChildCancelled"


def test_resolving_a_child_that_is_still_running_is_refused() -> None:
    s = with_child().given(c.StartStep(run_id=CHILD, step="render", attempt=1))
    s.when(RESOLVE).then_error(InvalidStateError)
    assert status(s) is RunStatus.WAITING


def test_resolving_a_child_twice_appends_nothing() -> None:
    s = with_child().given(c.CompleteRun(run_id=CHILD, output=1), RESOLVE)
    s.when(RESOLVE).then_events([])


def test_resolving_a_child_that_was_never_started_is_refused() -> None:
    s = started()
    s.when(RESOLVE).then_error(NotPendingError)


# ---------------------------------------------------------------------------- emit_event
EMIT = c.EmitEvent(run_id=RUN, name="announce", event_name="order.fulfilled", data={"id": 7})
EMITTED_ID = inbound_event_id(sent_event_id(RUN, "announce"))


def test_emitting_an_event_records_it_on_the_run_and_as_an_inbound_event() -> None:
    s = started()
    s.when(EMIT).then_events(["EventSent", "Received"])
    assert s.reply == EventSentReply(position=s.head(), event_id=EMITTED_ID, created=True)
    assert s.event(WorkflowRun.EventSent).event_id == EMITTED_ID
    received = s.event(InboundEvent.Received)
    assert (received.originator_id, received.name, received.data, received.sent_by_run) == (
        EMITTED_ID,
        "order.fulfilled",
        {"id": 7},
        RUN,
    )


def test_emitting_the_same_event_again_appends_nothing() -> None:
    s = started().given(EMIT)
    s.when(EMIT).then_events([])
    assert s.reply == EventSentReply(position=s.head(), event_id=EMITTED_ID, created=False)


def test_emitting_an_event_with_a_malformed_name_is_refused() -> None:
    s = started()
    bad = c.EmitEvent(run_id=RUN, name="announce", event_name="order fulfilled!")
    s.when(bad).then_error(InvalidCommandError)


# -------------------------------------------------------------------------- complete_run
def test_completing_a_run_records_its_output() -> None:
    s = started().given(step(), complete())
    s.when(c.CompleteRun(run_id=RUN, output={"receipt": "R-1"})).then_events(["RunCompleted"])
    run = s.run(RUN)
    assert (run.status, run.output) == (RunStatus.COMPLETED, {"receipt": "R-1"})


def test_completing_a_run_twice_appends_nothing() -> None:
    s = started().given(c.CompleteRun(run_id=RUN, output=1))
    s.when(c.CompleteRun(run_id=RUN, output=2)).then_events([])
    assert s.run(RUN).output == 1


def test_completing_a_failed_run_is_refused() -> None:
    s = started().given(fail_run())
    s.when(c.CompleteRun(run_id=RUN)).then_error(RunNotActiveError)


def test_completing_a_compensating_run_is_refused() -> None:
    s = with_completed_compensable_steps("charge").given(fail_run())
    s.when(c.CompleteRun(run_id=RUN)).then_error(InvalidStateError)


# ------------------------------------------------------------------------------ fail_run
def test_failing_a_run_without_compensations_fails_it_at_once() -> None:
    s = started().given(step(), complete())  # completed, but nothing to undo
    s.when(fail_run()).then_events(["RunFailed"])
    expected = {"type": "OrderRejected", "message": "no stock"}
    assert s.event(WorkflowRun.RunFailed).error == expected
    run = s.run(RUN)
    assert (run.status, run.error) == (RunStatus.FAILED, expected)


def test_failing_a_run_compensates_its_steps_latest_first() -> None:
    s = with_completed_compensable_steps("reserve", "charge", "ship")
    s.when(fail_run()).then_events(["CompensationStarted"])
    compensation = s.event(WorkflowRun.CompensationStarted)
    assert (compensation.reason, compensation.steps) == ("failed", ["ship", "charge", "reserve"])
    assert compensation.error == {"type": "OrderRejected", "message": "no stock"}
    assert status(s) is RunStatus.COMPENSATING


def test_compensating_out_of_reverse_order_is_refused() -> None:
    s = with_completed_compensable_steps("reserve", "charge").given(fail_run())
    s.when(compensate("reserve")).then_error(InvalidStateError)


def test_compensating_in_reverse_order_fails_the_run_after_the_last() -> None:
    s = with_completed_compensable_steps("reserve", "charge").given(fail_run())
    s.when(compensate("charge")).then_events(["StepCompensated"])
    assert status(s) is RunStatus.COMPENSATING
    s.when(compensate("reserve")).then_events(["StepCompensated", "RunFailed"])
    assert s.event(WorkflowRun.RunFailed).error["type"] == "OrderRejected"
    assert status(s) is RunStatus.FAILED


def test_failing_a_compensating_run_again_appends_nothing() -> None:
    s = with_completed_compensable_steps("charge").given(fail_run())
    s.when(fail_run("SomethingElse")).then_events([])


def test_failing_an_ended_run_is_refused() -> None:
    s = started().given(c.CompleteRun(run_id=RUN))
    s.when(fail_run()).then_error(RunNotActiveError)


# -------------------------------------------------------------------------- time_out_run
def test_timing_out_a_run_fails_it_with_a_timeout_error() -> None:
    s = Scenario().given(register(timeouts=Timeouts(run=60.0)), start())
    s.when(c.TimeOutRun(run_id=RUN)).then_events(["RunTimedOut"])
    error = s.event(WorkflowRun.RunTimedOut).error
    assert error["type"] == "RunTimeout"
    assert s.run(RUN).status is RunStatus.FAILED


def test_timing_out_a_run_compensates_its_steps_first() -> None:
    s = with_completed_compensable_steps("charge")
    s.when(c.TimeOutRun(run_id=RUN)).then_events(["CompensationStarted"])
    assert s.event(WorkflowRun.CompensationStarted).reason == "timed_out"
    s.when(compensate("charge")).then_events(["StepCompensated", "RunTimedOut"])
    assert status(s) is RunStatus.FAILED


def test_timing_out_a_completed_run_is_refused() -> None:
    s = started().given(c.CompleteRun(run_id=RUN))
    s.when(c.TimeOutRun(run_id=RUN)).then_error(RunNotActiveError)


# ----------------------------------------------------------------------- compensate_step
def test_compensating_a_step_twice_appends_nothing() -> None:
    s = with_completed_compensable_steps("reserve", "charge").given(
        fail_run(), compensate("charge")
    )
    s.when(compensate("charge")).then_events([])


def test_compensating_a_step_that_never_ran_is_refused() -> None:
    s = with_completed_compensable_steps("charge").given(fail_run())
    s.when(compensate("ship")).then_error(StepNotFoundError)


def test_compensating_a_step_of_a_run_that_is_not_compensating_is_refused() -> None:
    s = with_completed_compensable_steps("charge")
    s.when(compensate("charge")).then_error(InvalidStateError)


def test_compensating_a_step_without_a_compensation_is_refused() -> None:
    s = with_completed_compensable_steps("charge").given(step("notify"), complete("notify"))
    s.given(fail_run())
    s.when(compensate("notify")).then_error(InvalidStateError)


# ------------------------------------------------------------------- a run's status over time
def test_a_run_reports_the_status_of_what_it_is_doing() -> None:
    s = Scenario().given(register())
    timeline: list[tuple[c.Command, RunStatus]] = [
        (start(), RunStatus.QUEUED),
        (step(), RunStatus.RUNNING),
        (complete(), RunStatus.RUNNING),
        (c.StartSleep(run_id=RUN, name="cool-off", seconds=60), RunStatus.SLEEPING),
        (c.FireTimer(run_id=RUN, name="cool-off"), RunStatus.RUNNING),
        (c.StartWait(run_id=RUN, name="shipped", event_name=SHIPPED), RunStatus.WAITING),
        (c.TimeOutWait(run_id=RUN, name="shipped"), RunStatus.RUNNING),
        (c.CompleteRun(run_id=RUN, output="done"), RunStatus.COMPLETED),
    ]
    for command, expected in timeline:
        s.apply(command)
        assert status(s) is expected, f"after {type(command).__name__}"


def test_a_step_in_flight_outranks_a_pending_sleep_in_the_status() -> None:
    s = started().given(c.StartSleep(run_id=RUN, name="cool-off", seconds=60))
    s.given(step())
    assert status(s) is RunStatus.RUNNING


# ------------------------------------------------------------------- the error contract
def refused(make: Callable[[], c.Command]) -> DomainError:
    s = started()
    error = s.when(make()).error
    assert error is not None
    return error


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: start(workflow="payments"), "unknown_workflow"),
        (lambda: c.CancelRun(run_id=UNKNOWN_RUN), "run_not_found"),
        (lambda: step(attempt=2), "invalid_state"),
        (lambda: step("   "), "invalid_command"),
    ],
    ids=["unknown_workflow", "run_not_found", "invalid_state", "invalid_command"],
)
def test_every_refusal_carries_its_stable_error_code(
    make: Callable[[], c.Command], code: str
) -> None:
    assert refused(make).code == code


# ------------------------------------------------------------- first outcome of a step
def test_a_late_success_of_an_attempt_that_failed_for_good_changes_nothing() -> None:
    s = started().given(step(), fail(retryable=False))
    s.when(complete(output="late")).then_events([])
    assert s.run(RUN).steps["charge"].status is StepStatus.FAILED


def test_a_late_success_of_an_attempt_already_being_retried_changes_nothing() -> None:
    s = started().given(step(), fail())
    s.when(complete(output="late")).then_events([])
    assert s.run(RUN).steps["charge"].status is StepStatus.RETRYING


def test_cancelling_a_run_that_is_compensating_after_a_failure_is_refused() -> None:
    s = with_completed_compensable_steps("charge").given(fail_run())
    s.when(c.CancelRun(run_id=RUN)).then_error(InvalidStateError)
    assert s.run(RUN).status is RunStatus.COMPENSATING


def test_timing_out_a_run_without_a_run_timeout_says_so_plainly() -> None:
    s = started()
    s.when(c.TimeOutRun(run_id=RUN)).then_events(["RunTimedOut"])
    assert s.run(RUN).error == {"type": "RunTimeout", "message": "run exceeded its timeout"}


# --------------------------------------------------------- JSON the store gives back intact
@pytest.mark.parametrize(
    "payload",
    [
        {"_type_": "uuid_hex", "_data_": "0123456789abcdef0123456789abcdef"},
        {"nested": [{"_type_": "nope", "_data_": 1}]},
        float("nan"),
        {"ratio": float("inf")},
    ],
)
def test_json_the_store_would_not_give_back_intact_is_refused(payload: Any) -> None:
    with pytest.raises(ValidationError, match=r"reserves|not JSON"):
        c.StartRun(workflow=WORKFLOW, input=payload)
    with pytest.raises(ValidationError, match=r"reserves|not JSON"):
        c.CompleteStep(run_id=RUN, step="s", attempt=1, output=payload)


def test_event_data_shaped_like_a_store_marker_is_refused() -> None:
    with pytest.raises(ValidationError, match="reserves"):
        c.SendEvent(name="order.placed", data={"_type_": "x", "_data_": 1})
    with pytest.raises(ValidationError, match="reserves"):
        c.FailStep(
            run_id=RUN,
            step="s",
            attempt=1,
            error=c.StepError.model_validate(
                {"type": "E", "message": "m", "extra": {"_type_": "x", "_data_": 1}}
            ),
        )


def test_objects_with_other_underscore_keys_are_stored_and_read_back_as_given() -> None:
    payload = {"_type_": "mine", "_data_": 1, "more": True}
    s = Scenario().given(register(), start(input=payload))
    assert s.run(RUN).input == payload


# ------------------------------------------------- complete_run after its completions (ADR 16)
def test_a_run_completes_after_the_steps_it_names_have_completed() -> None:
    s = started().given(step("charge"), complete("charge"), step("ship"), complete("ship"))
    s.when(c.CompleteRun(run_id=RUN, output={"ok": True}, after_steps=["charge", "ship"]))
    s.then_events(["RunCompleted"])
    assert s.run(RUN).output == {"ok": True}


def test_a_run_naming_a_step_still_in_flight_is_refused_as_steps_pending_and_unchanged() -> None:
    s = started().given(step("charge"), complete("charge"), step("ship"))
    s.when(c.CompleteRun(run_id=RUN, output=1, after_steps=["charge", "ship", "never"]))
    error = s.then_error(StepsPendingError)
    assert error.reason == "steps_pending"
    assert error.details == [{"reason": "steps_pending"}]
    assert "'ship', 'never'" in error.message
    assert status(s) is RunStatus.RUNNING


def test_a_completed_run_takes_a_repeat_naming_any_steps_as_done() -> None:
    s = started().given(c.CompleteRun(run_id=RUN, output=1))
    s.when(c.CompleteRun(run_id=RUN, output=1, after_steps=["never"])).then_events([])


def test_after_steps_are_step_names_and_at_most_a_thousand() -> None:
    with pytest.raises(ValidationError):
        c.CompleteRun(run_id=RUN, after_steps=[""])
    with pytest.raises(ValidationError):
        c.CompleteRun(run_id=RUN, after_steps=["s"] * 1001)
