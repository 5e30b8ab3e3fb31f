"""The SDK without NATS: registration, and RunContext's replay decisions over a snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from unittest.mock import ANY
from uuid import UUID

import pytest
from pydantic import BaseModel, TypeAdapter

from domain.errors import InvalidStateError, RunNotFoundError
from domain.ids import run_id_for
from ledgerflow import Flow, NonRetryableError, RetryPolicy, RunContext, StepFailedError
from ledgerflow._ports import Transport
from ledgerflow.context import HandedBack, Refused, Superseded, Suspended, step_timeout
from ledgerflow.errors import CommandError, error_for
from ledgerflow.flow import workflow_name
from ledgerflow.worker import Outcome

RUN_ID = "00000000-0000-0000-0000-000000000001"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Money(BaseModel):
    cents: int


class FakeCommands:
    """Records the commands a context sends; answers each from a canned reply or error."""

    def __init__(self, run: dict[str, Any] | None = None) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.refuse: dict[str, Exception] = {}
        self.run = run

    async def __call__(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self.sent.append((name, body))
        if name in self.refuse:
            raise self.refuse[name]
        if name == "load_run":
            return {"ok": True, "run": self.run}
        return {"ok": True, "position": len(self.sent), "event_id": "e1"}

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.sent]


def snapshot(**parts: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "run_id": RUN_ID,
        "workflow": "wf",
        "status": "running",
        "dispatch": 1,
        "steps": {},
        "sleeps": {},
        "waits": {},
        "children": {},
        "sent_events": {},
    }
    return {**base, **parts}


def step_state(status: str, attempts: int = 1, **more: Any) -> dict[str, Any]:
    return {"status": status, "attempts": attempts, "output": None, "error": None, **more}


def context(run: dict[str, Any], fake: FakeCommands, **options: Any) -> RunContext:
    return RunContext(run, fake, 1, now=lambda: NOW, **options)


def charge() -> Money:
    raise AssertionError("a memoised step must not run")


# ------------------------------------------------------------------------ registration
def test_the_decorator_records_the_workflow_definition() -> None:
    flow = Flow("shop")

    @flow.workflow(triggers=["order.placed"], retry=RetryPolicy(max_attempts=5), concurrency=2)
    async def fulfil(ctx: RunContext, order: Money) -> Money:
        return order

    @flow.workflow(name="other", timeout=timedelta(minutes=1), queue="slow")
    async def other(ctx: RunContext, n: int) -> int:
        return n

    definition = flow["fulfil"]
    assert definition.fn is fulfil and workflow_name(fulfil) == "fulfil"
    assert definition.input_type is Money and definition.output_type is Money
    body = definition.registration("w1")
    assert body["triggers"] == ["order.placed"] and body["worker_id"] == "w1"
    assert body["retry_policy"]["max_attempts"] == 5
    assert body["concurrency"]["limit"] == 2
    assert flow["other"].registration()["timeouts"]["run"] == 60.0
    assert "timeouts" not in body
    assert flow.queues == ["shop", "slow"]  # by default, a flow's runs go to its own queue


def test_the_decorator_sends_a_default_step_timeout() -> None:
    flow = Flow("shop")

    @flow.workflow(step_timeout=timedelta(seconds=90))
    async def patient(ctx: RunContext) -> None:
        return None

    assert flow["patient"].registration()["timeouts"] == {
        "run": None,
        "step": 90.0,
        "heartbeat": None,
    }


def test_a_workflow_must_be_async_and_registered_once() -> None:
    flow = Flow("shop")
    with pytest.raises(TypeError):
        flow.workflow()(lambda ctx, x: x)

    async def wf(ctx: RunContext, x: int) -> int:
        return x

    flow.workflow()(wf)
    with pytest.raises(ValueError):
        flow.workflow()(wf)


# ------------------------------------------------------------------------------ replay
def test_a_completed_step_returns_its_recorded_output_without_running() -> None:
    fake = FakeCommands()
    run = snapshot(steps={"charge": step_state("completed", output={"cents": 5})})
    ctx = context(run, fake)
    assert asyncio.run(ctx.step("charge", charge)) == Money(cents=5)
    assert fake.sent == []


def test_a_new_step_is_started_with_the_dispatch_then_completed() -> None:
    fake = FakeCommands()
    ctx = context(snapshot(), fake)

    async def pay(n: int) -> Money:
        return Money(cents=n)

    assert asyncio.run(ctx.step("pay", pay, 7, compensate=print)) == Money(cents=7)
    assert fake.sent == [
        ("start_step", {"run_id": RUN_ID, "step": "pay", "attempt": 1, "dispatch": 1}),
        (
            "complete_step",
            {
                "run_id": RUN_ID,
                "step": "pay",
                "attempt": 1,
                "output": {"cents": 7},
                "compensable": True,
            },
        ),
    ]
    assert ctx.compensations["pay"].output == Money(cents=7)


def test_a_step_in_flight_when_its_worker_died_runs_its_next_attempt() -> None:
    fake = FakeCommands()
    ctx = context(snapshot(steps={"a": step_state("running", attempts=2)}), fake)
    assert asyncio.run(ctx.step("a", lambda: 1)) == 1
    assert fake.sent[0][1]["attempt"] == 3


def test_a_failed_attempt_suspends_when_the_step_will_be_retried() -> None:
    retrying = snapshot(steps={"a": step_state("retrying", retry_due_at=NOW.isoformat())})
    fake = FakeCommands(run=retrying)
    ctx = context(snapshot(), fake)

    def boom() -> None:
        raise ConnectionError("down")

    with pytest.raises(Suspended):
        asyncio.run(ctx.step("a", boom))
    assert fake.names == ["start_step", "fail_step", "load_run"]
    error = fake.sent[1][1]["error"]
    assert error == {"type": "ConnectionError", "message": "down", "traceback": ANY}
    assert error["traceback"].startswith("Traceback (most recent call last):")
    assert 'raise ConnectionError("down")' in error["traceback"]
    assert error["traceback"].endswith("ConnectionError: down\n")
    assert fake.sent[1][1]["retryable"] is True


def test_a_non_retryable_error_fails_the_step_for_good() -> None:
    failed = step_state("failed", error={"type": "NonRetryableError", "message": "no"})
    fake = FakeCommands(run=snapshot(steps={"a": failed}))
    ctx = context(snapshot(), fake)

    def declined() -> None:
        raise NonRetryableError("no")

    with pytest.raises(StepFailedError) as error:
        asyncio.run(ctx.step("a", declined))
    assert fake.sent[1][1]["retryable"] is False
    assert (error.value.type, error.value.message) == ("NonRetryableError", "no")


def test_a_retrying_step_waits_until_due_and_then_runs() -> None:
    later = (NOW + timedelta(minutes=5)).isoformat()
    run = snapshot(steps={"a": step_state("retrying", retry_due_at=later)})
    with pytest.raises(Suspended):
        asyncio.run(context(run, FakeCommands()).step("a", lambda: 1))
    fake = FakeCommands()
    assert asyncio.run(context(run, fake, reason="retry").step("a", lambda: 1)) == 1
    assert fake.sent[0][1]["attempt"] == 2


def test_a_stale_hand_off_lets_go() -> None:
    fake = FakeCommands()
    fake.refuse["start_step"] = error_for(
        "invalid_state", "run x was handed off again", [{"reason": "superseded"}]
    )
    with pytest.raises(Superseded):
        asyncio.run(context(snapshot(), fake).step("a", lambda: 1))


def test_sleeps_suspend_until_their_timer_fired() -> None:
    fake = FakeCommands()
    with pytest.raises(Suspended):
        asyncio.run(context(snapshot(), fake).sleep("nap", timedelta(seconds=3)))
    assert fake.sent == [("start_sleep", {"run_id": RUN_ID, "name": "nap", "seconds": 3.0})]
    pending = snapshot(sleeps={"nap": {"fired": False}})
    with pytest.raises(Suspended):
        asyncio.run(context(pending, FakeCommands()).sleep("nap", timedelta(seconds=3)))
    fired = snapshot(sleeps={"nap": {"fired": True}})
    asyncio.run(context(fired, FakeCommands()).sleep("nap", timedelta(seconds=3)))


def test_a_wait_returns_the_event_data_or_none_on_timeout() -> None:
    received = snapshot(waits={"w": {"outcome": "received", "data": {"ok": 1}}})
    timed_out = snapshot(waits={"w": {"outcome": "timed_out", "data": None}})
    assert asyncio.run(context(received, FakeCommands()).wait_for_event("w", "e")) == {"ok": 1}
    assert asyncio.run(context(timed_out, FakeCommands()).wait_for_event("w", "e")) is None


def test_replay_only_records_nothing_new() -> None:
    fake = FakeCommands()
    with pytest.raises(Suspended):
        asyncio.run(context(snapshot(), fake, replay_only=True).step("a", lambda: 1))
    assert fake.sent == []


def test_the_idempotency_key_is_the_run_and_the_step() -> None:
    assert context(snapshot(), FakeCommands()).idempotency_key("pay") == f"{RUN_ID}:pay"


def test_refusals_map_to_domain_errors_by_code() -> None:
    not_found = error_for("run_not_found", "run x not found")
    assert isinstance(not_found, RunNotFoundError) and not_found.code == "run_not_found"
    assert isinstance(error_for("invalid_state", "no"), InvalidStateError)
    other = error_for("unavailable", "down")
    assert isinstance(other, CommandError) and other.code == "unavailable"


def test_a_refusal_names_the_fields_its_details_name() -> None:
    details = [
        {"loc": ["first_step", "step"], "msg": "Field required", "type": "missing"},
        {"loc": [], "msg": "first_step needs eager", "type": "value_error"},
        {"reason": "superseded"},
    ]
    refused = error_for("invalid_command", "invalid start_run request", details)
    assert str(refused) == (
        "invalid start_run request: first_step.step: Field required; first_step needs eager"
    )
    assert str(error_for("invalid_state", "no", [{"reason": "superseded"}])) == "no"


# ------------------------------------------------------------------------ step timeouts
def test_the_steps_own_timeout_wins_over_the_workflows_default() -> None:
    defaults = snapshot(timeouts={"run": None, "step": 30.0, "heartbeat": None})
    assert step_timeout(timedelta(seconds=2), defaults) == 2.0
    assert step_timeout(None, defaults) == 30.0
    assert step_timeout(None, snapshot(timeouts={"run": 60.0, "step": None})) is None
    assert step_timeout(None, snapshot()) is None
    with pytest.raises(ValueError):
        step_timeout(timedelta(0), defaults)


def _retrying() -> dict[str, Any]:
    return snapshot(steps={"slow": step_state("retrying", retry_due_at=NOW.isoformat())})


def test_an_async_attempt_past_its_timeout_is_cancelled_and_fails_with_step_timeout() -> None:
    fake = FakeCommands(run=_retrying())
    ctx = context(snapshot(), fake)
    cancelled: list[bool] = []

    async def forever() -> str:
        try:
            await asyncio.Event().wait()  # never set: only the timeout ends it
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "never"

    with pytest.raises(Suspended):
        asyncio.run(ctx.step("slow", forever, timeout=timedelta(milliseconds=20)))
    assert cancelled == [True]
    assert fake.names == ["start_step", "fail_step", "load_run"]
    failed = fake.sent[1][1]
    assert failed["error"] == {
        "type": "StepTimeout",
        "message": "step 'slow' took longer than 0.02 s",
        "traceback": ANY,
    }
    assert failed["retryable"] is True and failed["attempt"] == 1


def test_a_sync_attempt_past_the_workflows_step_timeout_is_no_longer_awaited() -> None:
    fake = FakeCommands(run=_retrying())
    run = snapshot(timeouts={"run": None, "step": 0.02, "heartbeat": None})
    release = threading.Event()
    finished: list[str] = []

    def stuck() -> str:
        release.wait(10)  # runs on in its thread after the attempt was given up
        finished.append("late")
        return "late"

    async def attempt() -> None:
        try:
            await context(run, fake).step("slow", stuck)
        finally:
            release.set()  # so that asyncio.run's executor shutdown does not wait 10 s

    with pytest.raises(Suspended):
        asyncio.run(attempt())
    assert finished == ["late"]  # it did run on: threads cannot be stopped
    assert fake.sent[1][1]["error"]["type"] == "StepTimeout"


def test_an_attempt_within_its_timeout_completes_and_its_own_timeout_error_is_its_own() -> None:
    fake = FakeCommands(run=_retrying())
    ctx = context(snapshot(), fake)

    async def quick() -> int:
        return 7

    def raises_timeout() -> int:
        raise TimeoutError("the bank did not answer")

    assert asyncio.run(ctx.step("quick", quick, timeout=timedelta(seconds=5))) == 7
    assert fake.names == ["start_step", "complete_step"]
    with pytest.raises(Suspended):
        asyncio.run(ctx.step("slow", raises_timeout, timeout=timedelta(seconds=5)))
    assert fake.sent[3][1]["error"] == {
        "type": "TimeoutError",
        "message": "the bank did not answer",
        "traceback": ANY,
    }


def test_a_steps_type_hints_are_read_once_per_function(monkeypatch: pytest.MonkeyPatch) -> None:
    import typing

    from ledgerflow import flow as flow_module

    def charge(amount: int) -> dict[str, int]:
        return {"charged": amount}

    reads: list[object] = []
    real = typing.get_type_hints

    def counting(fn: Any) -> dict[str, Any]:
        reads.append(fn)
        return real(fn)

    monkeypatch.setattr(typing, "get_type_hints", counting)
    first, again = flow_module.type_hints(charge), flow_module.type_hints(charge)
    assert first == again == {"amount": int, "return": dict[str, int]}
    assert reads == [charge]
    assert flow_module.type_hints(lambda: None) == {}


def test_a_runs_input_is_validated_by_one_adapter_per_annotation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ledgerflow import context

    class Order(BaseModel):
        id: int

    built: list[object] = []
    real = TypeAdapter

    def counting(annotation: Any) -> Any:
        built.append(annotation)
        return real(annotation)

    monkeypatch.setattr(context, "TypeAdapter", counting)  # the name it builds with
    assert [context.decode_input([{"id": n}], list[Order]) for n in range(3)] == [
        [Order(id=0)],
        [Order(id=1)],
        [Order(id=2)],
    ]
    assert built == [list[Order]]
    with pytest.raises(ValueError):
        context.decode_input([{"id": "x"}], list[Order])


class SlowCommands(FakeCommands):
    """Answers each command only when the test says so, to see what is sent meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.answer: dict[str, asyncio.Event] = {}

    async def __call__(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self.sent.append((name, body))
        await self.answer.setdefault(f"{name}:{body.get('step')}", asyncio.Event()).wait()
        if name in self.refuse:
            raise self.refuse[name]
        return {"ok": True, "position": len(self.sent)}


def test_the_next_step_starts_while_a_completion_is_committed_but_runs_only_after_it() -> None:
    commands = SlowCommands()
    ran: list[str] = []

    async def scenario() -> None:
        ctx = context(snapshot(), commands)

        def step(name: str) -> str:
            ran.append(name)
            return name

        async def flow() -> None:
            await ctx.step("a", step, "a")
            await ctx.step("b", step, "b")

        commands.answer["start_step:a"] = asyncio.Event()
        commands.answer["start_step:a"].set()
        running = asyncio.create_task(flow())
        while commands.names[-1:] != ["start_step"] or len(commands.sent) < 3:
            await asyncio.sleep(0.001)
        # a's completion and b's start are both out, in that order; b has not run yet
        assert commands.names == ["start_step", "complete_step", "start_step"]
        commands.answer.setdefault("start_step:b", asyncio.Event()).set()
        await asyncio.sleep(0.01)
        assert ran == ["a"]
        commands.answer.setdefault("complete_step:a", asyncio.Event()).set()
        commands.answer.setdefault("complete_step:b", asyncio.Event()).set()
        await running
        await ctx.settled()

    asyncio.run(scenario())
    assert ran == ["a", "b"]


def test_a_refused_completion_stops_the_run_before_the_next_step_runs() -> None:
    commands = SlowCommands()
    commands.refuse["complete_step"] = InvalidStateError("run r has ended")
    ran: list[str] = []

    async def scenario() -> None:
        ctx = context(snapshot(), commands)
        for key in ("start_step:a", "complete_step:a", "start_step:b"):
            commands.answer.setdefault(key, asyncio.Event()).set()

        def step(name: str) -> str:
            ran.append(name)
            return name

        await ctx.step("a", step, "a")
        await ctx.step("b", step, "b")

    with pytest.raises(Refused, match="has ended"):
        asyncio.run(scenario())
    assert ran == ["a"]
    assert commands.names == ["start_step", "complete_step", "start_step"]


def test_a_run_ends_only_after_its_completions_are_answered() -> None:
    commands = SlowCommands()
    commands.refuse["complete_step"] = InvalidStateError("run r has ended")

    async def scenario() -> None:
        ctx = context(snapshot(), commands)
        for key in ("start_step:a", "complete_step:a"):
            commands.answer.setdefault(key, asyncio.Event()).set()
        assert await ctx.step("a", lambda: 1) == 1  # the workflow returns at once...
        await ctx.settled()  # ...and the worker learns of the refusal before complete_run

    with pytest.raises(Refused, match="has ended"):
        asyncio.run(scenario())


def test_a_completion_that_fails_hands_the_task_back_past_the_workflows_own_handlers() -> None:
    commands = SlowCommands()
    commands.refuse["complete_step"] = CommandError("unavailable", "no reply")
    ran: list[str] = []

    async def scenario() -> None:
        ctx = context(snapshot(), commands)
        for key in ("start_step:a", "complete_step:a", "start_step:b"):
            commands.answer.setdefault(key, asyncio.Event()).set()
        await ctx.step("a", lambda: 1)
        try:
            await ctx.step("b", lambda: ran.append("b"))
        except Exception:  # a workflow's own handler cannot swallow it
            ran.append("swallowed")

    with pytest.raises(HandedBack, match="complete_step got no answer"):
        asyncio.run(scenario())
    assert ran == []


def test_every_refused_completion_of_parallel_steps_is_read_before_the_refusal_is_raised() -> None:
    commands = SlowCommands()
    commands.refuse["complete_step"] = InvalidStateError("run r has ended")

    async def scenario() -> RunContext:
        ctx = context(snapshot(), commands)
        for key in ("start_step:a", "start_step:b", "complete_step:a"):
            commands.answer.setdefault(key, asyncio.Event()).set()
        await asyncio.gather(ctx.step("a", lambda: 1), ctx.step("b", lambda: 2))
        waiting = asyncio.create_task(ctx.settled())
        await asyncio.sleep(0.01)
        assert not waiting.done()  # b's completion is not answered yet: settled waits
        commands.answer.setdefault("complete_step:b", asyncio.Event()).set()
        with pytest.raises(Refused):
            await waiting
        return ctx

    ctx = asyncio.run(scenario())
    assert ctx._completing == []  # nothing left unread


# ------------------------------------------------------ the run's end behind its completions
def test_the_run_end_goes_out_behind_an_unanswered_completion_naming_its_step() -> None:
    commands = SlowCommands()

    async def scenario() -> None:
        ctx = context(snapshot(), commands)
        commands.answer.setdefault("start_step:a", asyncio.Event()).set()
        await ctx.step("a", lambda: 1)
        ending = ctx.end_after_completions({"sum": 1})
        assert ending is not None
        while commands.names[-1:] != ["complete_run"]:
            await asyncio.sleep(0.001)
        # sent before a's completion was answered, and after it on the wire
        assert commands.names == ["start_step", "complete_step", "complete_run"]
        assert commands.sent[-1][1] == {
            "run_id": RUN_ID,
            "output": {"sum": 1},
            "after_steps": ["a"],
        }
        commands.answer.setdefault("complete_step:a", asyncio.Event()).set()
        commands.answer.setdefault("complete_run:None", asyncio.Event()).set()
        await ctx.settled()
        assert (await ending.reply)["ok"]

    asyncio.run(scenario())


def test_with_every_completion_answered_the_worker_sends_the_end_itself() -> None:
    commands = FakeCommands()

    async def scenario() -> None:
        ctx = context(snapshot(), commands)
        await ctx.step("a", lambda: 1)
        await ctx.settled()
        assert ctx.end_after_completions(1) is None

    asyncio.run(scenario())
    assert commands.names == ["start_step", "complete_step"]


class EndingCommands(FakeCommands):
    """complete_run with after_steps is refused with ``refusal`` ``times`` times."""

    def __init__(self, refusal: Exception, times: int = 1) -> None:
        super().__init__()
        self.refusal = refusal
        self.times = times

    async def __call__(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if name == "complete_run" and "after_steps" in body and self.times > 0:
            self.times -= 1
            self.sent.append((name, body))
            raise self.refusal
        return await super().__call__(name, body)


GUARDED = {"run_id": RUN_ID, "output": 2, "after_steps": ["a"]}
STEPS_PENDING = error_for("invalid_state", "too early", [{"reason": "steps_pending"}])


def _complete_run(commands: FakeCommands, early: bool = True) -> Outcome:
    from infrastructure.settings import Settings
    from ledgerflow.context import EarlyEnd
    from ledgerflow.worker import Worker

    worker = Worker(Flow("f"), Settings(), transport=cast(Transport, _Sending(commands)))

    async def scenario() -> Outcome:
        ctx = context(snapshot(), commands)
        ctx.completed_steps.append("a")
        ending = (
            EarlyEnd(dict(GUARDED), asyncio.ensure_future(commands("complete_run", GUARDED)))
            if early
            else None
        )
        return await worker._complete_run(ctx, 2, ending)

    return asyncio.run(scenario())


def test_an_end_that_came_before_its_completion_is_sent_again_with_its_guard() -> None:
    commands = EndingCommands(STEPS_PENDING)
    assert _complete_run(commands) == Outcome.ACK
    assert commands.sent == [("complete_run", GUARDED), ("complete_run", GUARDED)]


def test_an_end_whose_step_never_completed_hands_the_run_back_instead_of_completing_it() -> None:
    """A completion that changed nothing (the step had failed meanwhile) is answered ok;
    the guard still refuses the end, and the run goes back for a replay."""
    commands = EndingCommands(STEPS_PENDING, times=2)
    assert _complete_run(commands) == Outcome.NAK
    assert commands.names == ["complete_run", "complete_run"]  # never unguarded


def test_a_plain_end_is_guarded_by_every_step_the_replay_completed_too() -> None:
    """No early end (every completion was answered): ``complete_run`` still names the
    steps, so a step whose completion changed nothing is not skipped either."""
    commands = EndingCommands(STEPS_PENDING)
    assert _complete_run(commands, early=False) == Outcome.NAK
    assert commands.sent == [("complete_run", GUARDED)]
    applied = EndingCommands(STEPS_PENDING, times=0)
    assert _complete_run(applied, early=False) == Outcome.ACK
    assert applied.sent == [("complete_run", GUARDED)]


def test_a_service_older_than_adr_16_gets_a_plain_end() -> None:
    for early in (True, False):
        commands = EndingCommands(error_for("invalid_command", "no after_steps here"))
        assert _complete_run(commands, early=early) == Outcome.ACK
        assert commands.sent == [
            ("complete_run", GUARDED),
            ("complete_run", {"run_id": RUN_ID, "output": 2}),
        ]


def test_an_end_refused_for_another_reason_is_raised() -> None:
    commands = EndingCommands(error_for("invalid_state", "run r is cancelled"))
    with pytest.raises(InvalidStateError, match="cancelled"):
        _complete_run(commands)
    assert commands.names == ["complete_run"]


def test_no_end_goes_out_early_while_a_step_of_the_run_is_still_running() -> None:
    """A workflow that returns the first of two raced steps: the other is still running,
    and its completion must be recorded before the run completes (ADR 15)."""
    commands = SlowCommands()

    async def scenario() -> None:
        ctx = context(snapshot(), commands)
        for key in ("start_step:fast", "start_step:slow"):
            commands.answer.setdefault(key, asyncio.Event()).set()
        release = asyncio.Event()

        async def slow() -> int:
            await release.wait()
            return 2

        racing = asyncio.ensure_future(ctx.step("slow", slow))
        assert await ctx.step("fast", lambda: 1) == 1
        assert ctx.end_after_completions(1) is None  # "slow" is in flight
        release.set()
        for key in ("complete_step:fast", "complete_step:slow"):
            commands.answer.setdefault(key, asyncio.Event()).set()
        await ctx.settled()
        await racing

    asyncio.run(scenario())
    assert "complete_run" not in commands.names


def test_an_output_that_cannot_be_encoded_is_not_a_failed_run() -> None:
    """It is raised out of the task (which the worker naks), as before ADR 16, not
    recorded as the workflow's own failure."""
    from infrastructure.settings import Settings
    from ledgerflow.worker import Worker

    flow = Flow("f")

    @flow.workflow()
    async def wf(ctx: RunContext) -> object:
        await ctx.step("a", lambda: 1)
        return object()

    commands = FakeCommands(snapshot(workflow=workflow_name(wf)))
    worker = Worker(flow, Settings(), transport=cast(Transport, _Sending(commands)))

    class Task:
        run_id, dispatch, reason = RUN_ID, 1, "start"

    with pytest.raises((TypeError, ValueError)):
        asyncio.run(worker._process(Task()))  # type: ignore[arg-type]
    assert "fail_run" not in commands.names


class _Sending:
    """The part of a Transport a worker's commands use."""

    def __init__(self, commands: FakeCommands) -> None:
        self.commands = commands
        self.held: list[str] = []

    async def command(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.commands(name, body)

    @contextlib.asynccontextmanager
    async def run_ends(self, run_id: str) -> AsyncIterator[asyncio.Event]:
        yield asyncio.Event()  # never heard: the eager run's own end is

    @contextlib.asynccontextmanager
    async def hold(self, run_id: str) -> AsyncIterator[None]:
        self.held.append(run_id)
        try:
            yield
        finally:
            self.held.remove(run_id)


# --------------------------------------------------------------- giving a task back
def test_a_task_given_back_again_and_again_waits_twice_as_long_each_time() -> None:
    from ledgerflow.worker import MAX_RETRY_DELAY, RETRY_DELAY, retry_delay

    assert [retry_delay(n) for n in (1, 2, 3, 4)] == [RETRY_DELAY * f for f in (1, 2, 4, 8)]
    assert retry_delay(0) == RETRY_DELAY
    assert retry_delay(10) == retry_delay(10_000) == MAX_RETRY_DELAY


def test_a_jetstream_task_knows_how_many_times_it_was_delivered() -> None:
    from nats.aio.msg import Msg

    from ledgerflow._transport import Task as NatsTask

    body = b'{"run_id": "r", "dispatch": 1, "reason": "start", "queue": "q", "position": 7}'
    third = Msg(cast(Any, None), "p.task.q", "$JS.ACK.S.C.3.10.5.1700000000000000000.0", body)
    assert NatsTask.of(third).deliveries == 3
    assert NatsTask.of(Msg(cast(Any, None), "p.task.q", "_INBOX.x", body)).deliveries == 1


def test_an_embedded_task_counts_its_deliveries_too() -> None:
    from infrastructure.embedded.engine import Delivery, EmbeddedQueue

    first = Delivery("r", 1, "start", "q", 7, EmbeddedQueue("q"))
    assert (first.deliveries, first._again().deliveries, first._again()._again().deliveries) == (
        1,
        2,
        3,
    )


def test_an_embedded_task_given_back_after_its_time_ran_out_is_not_queued_twice() -> None:
    from infrastructure.embedded.engine import Delivery, EmbeddedQueue

    async def scenario() -> list[int]:
        queue = EmbeddedQueue("q", ack_wait=60)
        late = Delivery("r", 1, "start", "q", 7, queue)
        late._expired()  # ack_wait ran out: delivered again
        await late.nak(0)  # the first holder gives it back late: nothing more
        return [t.deliveries for t in await queue.fetch(10, 0.1)]

    assert asyncio.run(scenario()) == [2]


def test_the_worker_gives_a_failing_task_back_with_the_delay_of_its_delivery() -> None:
    from infrastructure.settings import Settings
    from ledgerflow.worker import Worker, retry_delay

    worker = Worker(Flow("f"), Settings(), transport=cast(Transport, _Sending(FakeCommands())))
    naks: list[float | None] = []

    class ThirdDelivery:
        run_id, dispatch, reason, queue, position, deliveries = RUN_ID, 1, "start", "q", 7, 3

        async def ack(self) -> None:
            raise AssertionError("a failed task is not acked")

        async def nak(self, delay: float | None = None) -> None:
            naks.append(delay)

        async def in_progress(self) -> None:
            pass

    async def failing(task: Any) -> Any:
        raise RuntimeError("a bug")

    worker._process = failing  # type: ignore[method-assign]
    worker._working = 1
    asyncio.run(worker._hold(cast(Any, ThirdDelivery())))
    assert naks == [retry_delay(3)] == [4.0]


@pytest.mark.parametrize("command", ["start_step", "fail_step", "start_sleep"])
def test_a_command_that_gets_no_answer_hands_the_task_back_past_the_workflows_handlers(
    command: str,
) -> None:
    """A brief outage of the service must not fail the run through the workflow's own
    ``except Exception`` (and then ``fail_run``): the task goes back instead."""
    commands = FakeCommands()
    commands.refuse[command] = CommandError("unavailable", "no reply")
    swallowed: list[str] = []

    async def scenario() -> None:
        ctx = context(snapshot(), commands)

        def boom() -> None:
            raise ValueError("the step fails")

        try:
            if command == "start_sleep":
                await ctx.sleep("nap", timedelta(seconds=60))
            else:
                await ctx.step("a", boom)
        except Exception:
            swallowed.append(command)

    with pytest.raises(HandedBack, match="no reply"):
        asyncio.run(scenario())
    assert swallowed == []


# ------------------------------------------------------------------ eager start (ADR 17)
EAGER_FLOW = Flow("eager")


@EAGER_FLOW.workflow()
async def wf(ctx: RunContext) -> str:
    return await ctx.step("a", lambda: "done")


def _eager_worker(commands: FakeCommands) -> Any:
    from infrastructure.settings import Settings
    from ledgerflow.worker import Worker

    worker = Worker(EAGER_FLOW, Settings(), 1, transport=cast(Transport, _Sending(commands)))
    worker.ready.set()
    return worker


def eager_results(commands: FakeCommands, runs: int = 1) -> list[Any]:
    """The outputs of ``runs`` runs of ``wf`` started one after another by a client
    whose worker takes them eagerly, over ``commands``."""
    from ledgerflow import Client

    worker = _eager_worker(commands)

    async def scenario() -> list[Any]:
        client = Client(cast(Transport, _Sending(commands)), worker=worker)
        return [await client.result(await client.start("wf"), timeout=5) for _ in range(runs)]

    return asyncio.run(scenario())


class EagerCommands(FakeCommands):
    """start_run with ``eager`` replies with the run, unless ``refuse_eager``; one with a
    ``first_step`` is refused with ``refuse_first_step`` (a service older than ADR 20)."""

    def __init__(self, refuse_eager: bool = False, refuse_first_step: bool = False) -> None:
        super().__init__()
        self.refuse_eager = refuse_eager
        self.refuse_first_step = refuse_first_step

    async def __call__(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if name != "start_run":
            return await super().__call__(name, body)
        self.sent.append((name, body))
        refused = self.refuse_eager or ("first_step" in body and self.refuse_first_step)
        if body.get("eager") and refused:
            raise error_for("invalid_command", "invalid start_run request")
        reply = {"ok": True, "position": 2, "run_id": RUN_ID, "created": True}
        return {**reply, "run": snapshot(status="queued")} if body.get("eager") else reply


def test_a_client_with_a_worker_runs_its_eager_start_there_and_has_the_output() -> None:
    from ledgerflow import Client

    commands = EagerCommands()
    worker = _eager_worker(commands)

    async def scenario() -> Any:
        client = Client(cast(Transport, _Sending(commands)), worker=worker)
        run_id = await client.start("wf")
        return await client.result(run_id, timeout=5)

    assert asyncio.run(scenario()) == "done"
    assert commands.names == ["start_run", "start_step", "complete_step", "complete_run"]
    assert commands.sent[0][1]["eager"] is True
    assert worker.reserve_eager("wf")  # its slot is free again


def test_a_full_worker_or_an_unknown_workflow_starts_through_the_queue() -> None:
    from ledgerflow import Client

    commands = EagerCommands()
    worker = _eager_worker(commands)

    async def scenario() -> None:
        client = Client(cast(Transport, _Sending(commands)), worker=worker)
        await client.start("other")
        assert worker.reserve_eager("wf")  # the only slot
        await client.start("wf")

    asyncio.run(scenario())
    assert [body.get("eager") for _, body in commands.sent] == [None, None]


def test_a_service_older_than_adr_17_gets_a_plain_start_and_the_slot_is_given_back() -> None:
    from ledgerflow import Client

    commands = EagerCommands(refuse_eager=True)
    worker = _eager_worker(commands)

    async def scenario() -> str:
        return await Client(cast(Transport, _Sending(commands)), worker=worker).start("wf")

    assert asyncio.run(scenario()) == RUN_ID
    # With the first step (ADR 20), without it, then a plain start.
    assert [body.get("eager") for _, body in commands.sent] == [True, True, None]
    assert [body.get("first_step") for _, body in commands.sent] == [{"step": "a"}, None, None]
    assert worker.reserve_eager("wf")


def test_an_eager_run_given_back_goes_to_its_queue_at_once() -> None:
    commands = FakeCommands()
    commands.refuse["start_step"] = CommandError("unavailable", "no reply")
    worker = _eager_worker(commands)
    assert worker.reserve_eager("wf")

    async def scenario() -> Any:
        return await worker.run_eager(snapshot(status="queued"), 5)

    ended = asyncio.run(scenario())
    assert ended.completed is False
    assert commands.sent[-1] == (
        "dispatch_run",
        {"run_id": RUN_ID, "reason": "eager_expired", "cause": 5},
    )
    assert worker.reserve_eager("wf")


def test_a_queued_eager_hand_off_is_its_starters_and_is_dropped() -> None:
    commands = FakeCommands(snapshot())
    worker = _eager_worker(commands)

    class Queued:
        run_id, dispatch, reason, queue, position, deliveries = RUN_ID, 1, "eager", "q", 7, 1

    assert asyncio.run(worker._process(cast(Any, Queued()))) is Outcome.ACK
    assert commands.sent == []


def test_an_eager_end_that_did_not_complete_the_run_leaves_the_output_to_the_store() -> None:
    """Another holder completed the run first (it was handed off): its output stands."""

    class Late(EagerCommands):
        async def __call__(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
            if name == "complete_run":
                self.sent.append((name, body))
                return {"ok": True, "position": 9, "completed_now": False}
            if name == "load_run":
                self.sent.append((name, body))
                return {"ok": True, "run": snapshot(status="completed", output="theirs")}
            return await super().__call__(name, body)

    assert eager_results(Late()) == ["theirs"]


def test_tasks_fetched_beyond_the_slots_eager_runs_took_meanwhile_go_back_at_once() -> None:
    from infrastructure.settings import Settings
    from ledgerflow.worker import Worker

    worker = Worker(EAGER_FLOW, Settings(), 2, transport=cast(Transport, _Sending(FakeCommands())))
    worker.ready.set()
    naks: list[str] = []
    stop = asyncio.Event()

    class Fetched:
        dispatch, reason, queue, position, deliveries = 1, "start", "q", 7, 1

        def __init__(self, run_id: str) -> None:
            self.run_id = run_id

        async def nak(self, delay: float | None = None) -> None:
            naks.append(self.run_id)

    class Queue:
        queue = "q"

        async def fetch(self, count: int, timeout: float) -> list[Any]:
            assert worker.reserve_eager("wf")  # an eager start while the fetch waited
            stop.set()
            return [Fetched("r1"), Fetched("r2")]

    async def scenario() -> None:
        held: list[Any] = []
        worker._hold = lambda task: held.append(task) or asyncio.sleep(0)  # type: ignore[method-assign,func-returns-value]
        await worker._pull(cast(Any, Queue()), stop, set())
        assert [t.run_id for t in held] == ["r1"]

    asyncio.run(scenario())
    assert naks == ["r2"]


# ------------------------------------------------------- an eager start's first step (ADR 20)
PROBED = Flow("probed")
RAN: list[str] = []
"""Step functions the probe must never run: every one that ran, by name."""


def ran(name: str) -> str:
    RAN.append(name)
    return name


@PROBED.workflow()
async def keyed_step(ctx: RunContext, data: dict[str, Any]) -> str:
    retry = RetryPolicy(max_attempts=3)
    return await ctx.step(f"charge {data['n']}", ran, ctx.idempotency_key("charge"), retry=retry)


@PROBED.workflow()
async def sleeps_first(ctx: RunContext) -> None:
    await ctx.sleep("nap", timedelta(seconds=1))
    await ctx.step("a", ran, "a")


async def side_effect(ctx: RunContext, name: str) -> str:
    ran(name)  # a side effect outside a step: the probe must never get here
    return await ctx.step(name, ran, name)


@PROBED.workflow()
async def gathers(ctx: RunContext) -> None:
    await asyncio.gather(side_effect(ctx, "a"), side_effect(ctx, "b"))


@PROBED.workflow()
async def named_by_run(ctx: RunContext) -> None:
    await ctx.step(f"charge {ctx.run_id}", ran, "a")


@PROBED.workflow()
async def cleans_up(ctx: RunContext) -> None:
    try:
        await ctx.step("a", ran, "a")
    finally:
        await ctx.step("release", ran, "release")


@PROBED.workflow()
async def awaits_first(ctx: RunContext) -> None:
    await asyncio.sleep(0)
    await ctx.step("a", ran, "a")


@PROBED.workflow()
async def spawns(ctx: RunContext) -> None:
    side = asyncio.create_task(side_effect(ctx, "side"))
    await ctx.step("a", ran, "a")
    await side


@PROBED.workflow()
async def audits(ctx: RunContext) -> None:
    try:
        await asyncio.sleep(0)  # its first operation is not the context's
        await ctx.step("charge", ran, "charge")
    finally:
        await ctx.step("audit", ran, "audit")


@PROBED.workflow()
async def named_by_run_hex(ctx: RunContext) -> None:
    await ctx.step(f"charge {UUID(ctx.run_id).hex[:8]}", ran, "a")


TAG: contextvars.ContextVar[str] = contextvars.ContextVar("TAG", default="caller's")


@PROBED.workflow()
async def tags(ctx: RunContext) -> None:
    TAG.set(ctx.run_id)
    await ctx.step("a", ran, "a")


@PROBED.workflow()
async def times_out_at_once(ctx: RunContext) -> None:
    await ctx.step("a", ran, "a", timeout=timedelta(0))


@PROBED.workflow()
async def cancels_itself(ctx: RunContext) -> None:
    raise asyncio.CancelledError


@PROBED.workflow()
async def ends_at_once(ctx: RunContext) -> int:
    return 1


class Order(BaseModel):
    n: int


@PROBED.workflow()
async def typed(ctx: RunContext, order: Order) -> None:
    await ctx.step("a", ran, "a")


def _probe(workflow: str, input: Any = None, key: str | None = None) -> dict[str, Any] | None:
    from infrastructure.settings import Settings
    from ledgerflow.worker import Worker

    worker = Worker(PROBED, Settings(), 1, transport=cast(Transport, _Sending(FakeCommands())))
    made: list[Any] = []

    async def probe() -> dict[str, Any] | None:
        loop = asyncio.get_running_loop()

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **options: Any) -> Any:
            made.append(coro)  # the caller's own factory: never the probe's
            return asyncio.Task(coro, loop=loop, **options)

        loop.set_task_factory(factory)
        found = worker.first_step(workflow, input, key)
        assert made == []  # not used while the probe ran
        assert loop.get_task_factory() is factory  # put back
        assert TAG.get() == "caller's"  # what the workflow set stayed in the probe
        for _ in range(3):
            await asyncio.sleep(0)  # any task the probe left would run now
        return found

    RAN.clear()
    found = asyncio.run(probe())
    gc.collect()  # a future left behind and never read would be logged now
    assert RAN == []
    return found


def test_the_probe_finds_the_step_a_workflow_begins_with_running_nothing() -> None:
    assert _probe("keyed_step", {"n": 7}) == {
        "step": "charge 7",
        "retry_policy": RetryPolicy(max_attempts=3).to_json(),
    }
    assert _probe("cleans_up") == {"step": "a"}  # the first, not its finally's
    assert _probe("spawns") == {"step": "a"}  # the task it made never runs
    assert _probe("typed", {"n": 1}) == {"step": "a"}
    assert _probe("tags") == {"step": "a"}
    # A keyed run's id is known before its start: a name made of it is begun.
    key_hex = run_id_for("named_by_run_hex", "k-1").hex[:8]
    assert _probe("named_by_run_hex", key="k-1") == {"step": f"charge {key_hex}"}


def test_the_probe_leaves_no_future_unread(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        assert _probe("gathers") is None
    assert "never retrieved" not in caplog.text


@pytest.mark.parametrize(
    ("workflow", "input"),
    [
        ("sleeps_first", None),
        ("gathers", None),  # its steps run in tasks, which the probe does not run
        ("named_by_run", None),  # the run's id is not known before its start
        ("named_by_run_hex", None),
        ("audits", None),  # its finally's step, on close, is not its first
        ("times_out_at_once", None),  # refused by the replay, as ever
        ("cancels_itself", None),
        ("awaits_first", None),
        ("ends_at_once", None),
        ("typed", {"n": "not a number"}),
        ("unknown", None),
    ],
)
def test_the_probe_finds_no_first_step_unless_a_step_comes_first_for_sure(
    workflow: str, input: Any
) -> None:
    assert _probe(workflow, input) is None


class FirstStepCommands(EagerCommands):
    """An eager start records the ``first_step`` it is asked to, as the service does."""

    async def __call__(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = await super().__call__(name, body)
        first = body.get("first_step") if name == "start_run" else None
        if first is not None:
            reply["run"]["steps"] = {first["step"]: step_state("running")}
        return reply


def test_an_eager_run_runs_the_step_its_start_began_without_starting_it_again() -> None:

    commands = FirstStepCommands()
    assert eager_results(commands) == ["done"]
    assert commands.names == ["start_run", "complete_step", "complete_run"]
    assert commands.sent[0][1]["first_step"] == {"step": "a"}
    assert commands.sent[1][1]["attempt"] == 1


def test_a_replay_meeting_another_step_first_starts_it_as_ever() -> None:
    """A workflow that is not deterministic: the step its start began is left running."""

    async def work(ctx: RunContext) -> str:
        return await ctx.step("b", lambda: "b")

    fake = FakeCommands()
    run = snapshot(steps={"a": step_state("running")})
    ctx = context(run, fake, started="a")
    assert asyncio.run(work(ctx)) == "b"
    assert fake.names == ["start_step", "complete_step"]
    assert fake.sent[0][1]["step"] == "b"


def test_a_step_its_start_began_runs_only_as_that_first_attempt() -> None:
    """``started`` names a step no longer at its first attempt: it is started anew."""

    async def work(ctx: RunContext) -> str:
        return await ctx.step("a", lambda: "a")

    fake = FakeCommands()
    ctx = context(snapshot(steps={"a": step_state("running", attempts=2)}), fake, started="a")
    assert asyncio.run(work(ctx)) == "a"
    assert [(n, b.get("attempt")) for n, b in fake.sent] == [
        ("start_step", 3),
        ("complete_step", 3),
    ]


def test_a_service_older_than_adr_20_gets_eager_starts_without_a_first_step() -> None:

    commands = EagerCommands(refuse_first_step=True)
    assert eager_results(commands, runs=2) == ["done", "done"]
    starts = [body for name, body in commands.sent if name == "start_run"]
    assert [(b.get("eager"), "first_step" in b) for b in starts] == [
        (True, True),  # refused
        (True, False),
        (True, False),  # asked no more
    ]
    assert commands.names.count("start_step") == 2  # each run's step started as before


def test_the_attempt_a_start_began_fails_as_that_attempt() -> None:
    async def work(ctx: RunContext) -> None:
        return await ctx.step("a", _boom, retry=RetryPolicy(max_attempts=1))

    fake = FakeCommands(snapshot(steps={"a": step_state("failed", error={"type": "X"})}))
    ctx = context(snapshot(steps={"a": step_state("running")}), fake, started="a")
    with pytest.raises(StepFailedError):
        asyncio.run(work(ctx))
    assert fake.names == ["fail_step", "load_run"]
    assert fake.sent[0][1]["attempt"] == 1


def _boom() -> None:
    raise ValueError("boom")


def test_a_stopping_worker_runs_the_attempt_its_start_began_and_then_hands_back() -> None:
    """Given back unrun, the recorded attempt would cost one (the next holder's is 2)."""

    async def work(ctx: RunContext) -> None:
        await ctx.step("a", lambda: "a")
        await ctx.step("b", lambda: "b")

    fake = FakeCommands()
    run = snapshot(steps={"a": step_state("running")})
    ctx = context(run, fake, started="a", stopping=lambda: True)
    with pytest.raises(HandedBack):
        asyncio.run(work(ctx))
    assert fake.names == ["complete_step"]
