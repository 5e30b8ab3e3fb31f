"""Each durable feature end to end: commands, relay, the real scheduler on a moved clock, worker."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest.mock import ANY

import pytest

from infrastructure.settings import Settings
from ledgerflow import (
    ChildFailedError,
    Flow,
    NonRetryableError,
    RetryPolicy,
    RunContext,
    RunFailedError,
)
from services.clock import ManualClock
from tests.integration.durable_stack import DEADLINE, Stack, everything, kinds

pytestmark = pytest.mark.integration

flow = Flow("features")
CALLS: Counter[str] = Counter()
UNDONE: list[str] = []  # compensations, in the order they ran
BROKEN: set[str] = set()  # steps that fail while named here
GATES: dict[str, asyncio.Event] = {}  # steps that block until the test opens their gate
STARTED: dict[str, asyncio.Event] = {}


def effect(name: str) -> Callable[[], str]:
    """A step body that counts its calls and fails while ``name`` is BROKEN."""

    def run() -> str:
        CALLS[name] += 1
        if name in BROKEN:
            raise ConnectionError(f"{name}: the service is down")
        return f"{name}-done"

    return run


def undo(name: str) -> Callable[[str], None]:
    def run(output: str) -> None:
        UNDONE.append(f"{name}({output})")

    return run


async def gated(name: str) -> str:
    CALLS[name] += 1
    STARTED[name].set()
    await GATES[name].wait()
    return f"{name}-done"


# ---------------------------------------------------------------------------- workflows
@flow.workflow()
async def alarm(ctx: RunContext, data: dict[str, str]) -> str:
    await ctx.sleep_until("alarm", datetime.fromisoformat(data["at"]))
    return await ctx.step("ring", effect(f"ring-{data['who']}"))


@flow.workflow()
async def approval(ctx: RunContext, order: str) -> dict[str, Any]:
    decision = await ctx.wait_for_event(
        "approval", "order.approved", match={"order": order}, timeout=timedelta(hours=1)
    )
    escalated = await ctx.step("escalate", effect("escalate")) if decision is None else None
    return {"decision": decision, "escalated": escalated}


@flow.workflow()
async def doomed(ctx: RunContext, sku: str) -> str:
    def reserve() -> str:
        CALLS["doomed.reserve"] += 1
        raise NonRetryableError(f"no stock of {sku}")

    return await ctx.step("reserve", reserve)


@flow.workflow()
async def tolerant_parent(ctx: RunContext, sku: str) -> dict[str, Any]:
    try:
        await ctx.invoke("stock", doomed, sku)
    except ChildFailedError as e:
        backorder = await ctx.step("backorder", effect("backorder"))
        return {"backorder": backorder, "child_error": e.type, "message": e.message}
    return {"backorder": None}


@flow.workflow()
async def strict_parent(ctx: RunContext, sku: str) -> str:
    await ctx.invoke("stock", doomed, sku)
    return await ctx.step("ship", effect("ship"))


@flow.workflow()
async def saga(ctx: RunContext, mode: str) -> str:
    await ctx.step("reserve", effect("reserve"), compensate=undo("release"))
    if mode == "gated":
        await ctx.step("charge", gated, "charge", compensate=undo("refund"))
    else:
        await ctx.step("charge", effect("charge"), compensate=undo("refund"))
    await ctx.sleep("cool-off", timedelta(days=1))
    return await ctx.step("ship", effect("ship"))


@flow.workflow()
async def doomed_saga(ctx: RunContext) -> str:
    await ctx.step("reserve", effect("reserve"), compensate=undo("release"))
    await ctx.step("charge", effect("charge"), compensate=undo("refund"))
    BROKEN.add("ship")
    return await ctx.step("ship", effect("ship"), retry=RetryPolicy(max_attempts=1))


@flow.workflow(timeout=timedelta(minutes=5))
async def hurried(ctx: RunContext) -> str:
    await ctx.step("reserve", effect("reserve"), compensate=undo("release"))
    await ctx.sleep("pause", timedelta(hours=1))
    return await ctx.step("ship", effect("ship"))


@flow.workflow()
async def resumable(ctx: RunContext) -> list[str]:
    budget = RetryPolicy(max_attempts=2, initial_interval=1, max_interval=1)
    first = await ctx.step("fetch", effect("fetch"))
    second = await ctx.step("transform", effect("transform"), retry=budget)
    third = await ctx.step("load", effect("load"))
    return [first, second, third]


@flow.workflow(retry=RetryPolicy(max_attempts=5, initial_interval=1, max_interval=1))
async def fussy(ctx: RunContext) -> str:
    def validate() -> str:
        CALLS["validate"] += 1
        raise NonRetryableError("the card number is malformed")

    await ctx.step("validate", validate)
    return await ctx.step("charge", effect("charge"))


# ---------------------------------------------------------------------------- harness
@pytest.fixture
def settings(backend_settings: Settings) -> Settings:
    """Every scenario here runs on the embedded engine and on PostgreSQL + NATS."""
    return backend_settings


def on_stack(settings: Settings, scenario: Callable[[Stack], Awaitable[None]]) -> None:
    CALLS.clear()
    UNDONE.clear()
    BROKEN.clear()
    GATES.clear()
    STARTED.clear()
    clock = ManualClock(datetime.now(tz=UTC))

    async def main() -> None:
        async with everything(settings, clock, flow) as stack:
            await scenario(stack)

    asyncio.run(main())


def status_is(status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda run: bool(run["status"] == status)


def step_is(step: str, status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda run: bool((run["steps"].get(step) or {}).get("status") == status)


async def failure(stack: Stack, run_id: str) -> RunFailedError:
    with pytest.raises(RunFailedError) as failed:
        await stack.client.result(run_id, timeout=DEADLINE)
    return failed.value


# ------------------------------------------------------------------------------ tests
def test_sleep_until_wakes_at_the_given_time_and_not_before(settings: Settings) -> None:
    async def scenario(stack: Stack) -> None:
        clock, client = stack.clock, stack.client

        async def set_alarm(who: str, hours: int) -> str:
            at = clock.now() + timedelta(hours=hours)
            run_id = await client.start(alarm, {"who": who, "at": at.isoformat()})
            await stack.until_run(run_id, status_is("sleeping"), f"{who}'s alarm to be set")
            return run_id

        late, early = await set_alarm("late", 3), await set_alarm("early", 1)
        clock.advance(timedelta(hours=2))
        assert await client.result(early, timeout=DEADLINE) == "ring-early-done"
        # The poller fires every due timer in one pass: the late alarm would have rung by now.
        assert (await client.get(late))["status"] == "sleeping"
        assert CALLS["ring-late"] == 0

        clock.advance(timedelta(hours=1, minutes=1))
        assert await client.result(late, timeout=DEADLINE) == "ring-late-done"
        assert CALLS == {"ring-early": 1, "ring-late": 1}
        assert kinds(await stack.history(late)) == [
            "RunStarted",
            "SleepStarted",
            "TimerFired",
            "StepStarted",
            "StepCompleted",
            "RunCompleted",
        ]

    on_stack(settings, scenario)


def test_a_wait_for_an_event_that_never_comes_times_out_with_none(settings: Settings) -> None:
    async def scenario(stack: Stack) -> None:
        clock, client = stack.clock, stack.client
        run_id = await client.start(approval, "o-7")
        await stack.until_run(run_id, status_is("waiting"), "the wait for the approval")
        await client.send_event("order.approved", {"order": "o-8"})  # someone else's
        clock.advance(timedelta(minutes=59))
        await client.send_event("order.declined", {"order": "o-7"})  # not the awaited name

        clock.advance(timedelta(minutes=2))  # the hour is up
        output = await client.result(run_id, timeout=DEADLINE)
        assert output == {"decision": None, "escalated": "escalate-done"}
        run = await client.get(run_id)
        assert run["waits"]["approval"]["outcome"] == "timed_out"
        assert kinds(await stack.history(run_id)) == [
            "RunStarted",
            "WaitStarted",
            "WaitTimedOut",
            "StepStarted",
            "StepCompleted",
            "RunCompleted",
        ]

        # An approval after the timeout changes nothing.
        await client.send_event("order.approved", {"order": "o-7"})
        assert (await client.get(run_id))["output"] == output

    on_stack(settings, scenario)


def test_a_parent_catches_its_failed_child_and_carries_on(settings: Settings) -> None:
    async def scenario(stack: Stack) -> None:
        client = stack.client
        run_id = await client.start(tolerant_parent, "sku-1")
        output = await client.result(run_id, timeout=DEADLINE)
        assert output == {
            "backorder": "backorder-done",
            "child_error": "StepFailedError",
            "message": "step 'reserve' failed: NonRetryableError: no stock of sku-1",
        }
        child = (await client.get(run_id))["children"]["stock"]
        assert child["outcome"] == "failed"
        child_run = await client.get(child["run_id"])
        assert child_run["status"] == "failed"
        assert child_run["error"]["type"] == "StepFailedError"
        assert CALLS == {"doomed.reserve": 1, "backorder": 1}

    on_stack(settings, scenario)


def test_a_parent_that_does_not_catch_its_failed_child_fails(settings: Settings) -> None:
    async def scenario(stack: Stack) -> None:
        run_id = await stack.client.start(strict_parent, "sku-2")
        failed = await failure(stack, run_id)
        assert failed.status == "failed"
        assert failed.error["type"] == "ChildFailedError"
        assert "no stock of sku-2" in failed.error["message"]
        assert CALLS == {"doomed.reserve": 1}  # nothing shipped

    on_stack(settings, scenario)


def test_cancelling_a_sleeping_run_undoes_its_steps_latest_first(settings: Settings) -> None:
    async def scenario(stack: Stack) -> None:
        client = stack.client
        run_id = await client.start(saga, "plain")
        await stack.until_run(run_id, status_is("sleeping"), "the cool-off")
        await client.cancel(run_id, "the customer changed their mind")

        failed = await failure(stack, run_id)
        assert failed.status == "cancelled"
        assert UNDONE == ["refund(charge-done)", "release(reserve-done)"]
        assert CALLS == {"reserve": 1, "charge": 1}  # never shipped
        run = await client.get(run_id)
        assert {s: run["steps"][s]["status"] for s in ("reserve", "charge")} == {
            "reserve": "compensated",
            "charge": "compensated",
        }
        events = await stack.history(run_id)
        assert kinds(events)[-5:] == [
            "CancelRequested",
            "CompensationStarted",
            "StepCompensated",
            "StepCompensated",
            "RunCancelled",
        ]
        assert [e.step for e in events if type(e).__name__ == "StepCompensated"] == [
            "charge",
            "reserve",
        ]

    on_stack(settings, scenario)


def test_cancelling_a_run_mid_step_records_the_step_then_undoes_it(settings: Settings) -> None:
    async def scenario(stack: Stack) -> None:
        client = stack.client
        GATES["charge"], STARTED["charge"] = asyncio.Event(), asyncio.Event()
        run_id = await client.start(saga, "gated")
        await asyncio.wait_for(STARTED["charge"].wait(), DEADLINE)
        await client.cancel(run_id)

        run = await client.get(run_id)
        assert run["cancel_requested"] is True
        assert (run["status"], run["steps"]["charge"]["status"]) == ("running", "running")
        assert UNDONE == []  # a cancel waits for the step in flight

        GATES["charge"].set()
        failed = await failure(stack, run_id)
        assert failed.status == "cancelled"
        assert UNDONE == ["refund(charge-done)", "release(reserve-done)"]
        assert CALLS == {"reserve": 1, "charge": 1}
        events = await stack.history(run_id)
        assert kinds(events)[-7:] == [
            "StepStarted",
            "CancelRequested",
            "StepCompleted",
            "CompensationStarted",
            "StepCompensated",
            "StepCompensated",
            "RunCancelled",
        ]
        assert "SleepStarted" not in kinds(events)

    on_stack(settings, scenario)


def test_a_failing_run_undoes_each_completed_step_once_latest_first(settings: Settings) -> None:
    async def scenario(stack: Stack) -> None:
        run_id = await stack.client.start(doomed_saga)
        failed = await failure(stack, run_id)
        assert (failed.status, failed.error["type"]) == ("failed", "StepFailedError")
        assert UNDONE == ["refund(charge-done)", "release(reserve-done)"]
        assert CALLS == {"reserve": 1, "charge": 1, "ship": 1}

    on_stack(settings, scenario)


def test_a_run_past_its_timeout_fails_and_undoes_its_steps(settings: Settings) -> None:
    async def scenario(stack: Stack) -> None:
        client = stack.client
        run_id = await client.start(hurried)
        await stack.until_run(run_id, status_is("sleeping"), "the pause")
        stack.clock.advance(timedelta(minutes=4))
        await stack.until_run(run_id, status_is("sleeping"), "the run still within its time")

        stack.clock.advance(timedelta(minutes=2))  # past the run's five minutes
        failed = await failure(stack, run_id)
        assert failed.status == "failed"
        assert failed.error["type"] == "RunTimeout"
        assert UNDONE == ["release(reserve-done)"]
        assert CALLS == {"reserve": 1}
        assert kinds(await stack.history(run_id))[-3:] == [
            "CompensationStarted",
            "StepCompensated",
            "RunTimedOut",
        ]

    on_stack(settings, scenario)


def test_retrying_a_failed_run_resumes_from_the_failed_step(settings: Settings) -> None:
    async def scenario(stack: Stack) -> None:
        client = stack.client
        BROKEN.add("transform")
        run_id = await client.start(resumable)
        await stack.until_run(run_id, step_is("transform", "retrying"), "transform's retry")
        stack.clock.advance(timedelta(seconds=2))
        failed = await failure(stack, run_id)
        assert failed.error["type"] == "StepFailedError"
        assert CALLS == {"fetch": 1, "transform": 2}  # its budget of two attempts is spent

        BROKEN.clear()  # the service is back
        await client.retry(run_id)
        output = await client.result(run_id, timeout=DEADLINE)
        assert output == ["fetch-done", "transform-done", "load-done"]
        assert CALLS == {"fetch": 1, "transform": 3, "load": 1}
        run = await client.get(run_id)
        assert run["steps"]["transform"]["attempts"] == 3  # attempt numbers keep growing
        assert "RunRetried" in kinds(await stack.history(run_id))

    on_stack(settings, scenario)


def test_a_non_retryable_error_fails_the_run_at_once(settings: Settings) -> None:
    async def scenario(stack: Stack) -> None:
        run_id = await stack.client.start(fussy)
        failed = await failure(stack, run_id)
        assert failed.status == "failed"
        assert failed.error["type"] == "StepFailedError"
        run = await stack.client.get(run_id)
        step = run["steps"]["validate"]
        assert (step["status"], step["attempts"]) == ("failed", 1)
        assert step["error"] == {
            "type": "NonRetryableError",
            "message": "the card number is malformed",
            "traceback": ANY,
        }
        assert "NonRetryableError: the card number is malformed" in step["error"]["traceback"]
        assert CALLS == {"validate": 1}
        assert kinds(await stack.history(run_id)) == [
            "RunStarted",
            "StepStarted",
            "StepFailed",
            "RunFailed",
        ]

    on_stack(settings, scenario)
