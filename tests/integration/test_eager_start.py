"""Eager start (ADR 17): a run started by a client with a worker in its process runs there
at once, and goes to the queue only if that worker lets it go or is gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import nats
import psycopg
import pytest

from infrastructure.nats.names import Names
from infrastructure.postgres import scheduler_schema as ss
from infrastructure.settings import Settings
from ledgerflow import Client, Flow, RunContext, Worker
from services.clock import ManualClock
from services.scheduler import EAGER_LEASE, LEASE_GRACE, Lease
from tests.integration.durable_stack import DEADLINE, Stack, everything, kinds
from tests.support import waiting

pytestmark = pytest.mark.integration

flow = Flow("eager")
STEPS: list[str] = []
"""Which worker ran each step attempt (``eager`` or ``queue``), in order."""
GATE: dict[str, asyncio.Event] = {}
"""A step named here waits for its event: the test holds the run in that step."""


def who() -> str:
    task = asyncio.current_task()
    return "eager" if task is not None and task.get_name().startswith("eager-") else "queue"


async def step(name: str) -> str:
    STEPS.append(f"{name}:{who()}")
    gate = GATE.get(name)
    if gate is not None:
        await gate.wait()
    return name


@flow.workflow()
async def three(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    done = [await ctx.step(name, step, name) for name in ("charge", "reserve", "ship")]
    return {"order": data["order"], "done": done}


@pytest.fixture
def settings(backend_settings: Settings) -> Settings:
    """Every scenario here runs on the embedded engine and on PostgreSQL + NATS."""
    return backend_settings


@pytest.fixture(autouse=True)
def _fresh() -> None:
    STEPS.clear()
    GATE.clear()


@dataclass
class Starter:
    client: Client
    worker: Worker
    stop: asyncio.Event


@asynccontextmanager
async def starter(stack: Stack, settings: Settings) -> AsyncIterator[Starter]:
    """Another process, in effect: a client with a worker of its own for ``flow``."""
    transport = await stack.connect()
    worker = Worker(flow, settings, 2, transport=transport)
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.run(stop))
    client = Client(transport, worker=worker)
    try:
        await waiting.until(_ready(worker, serving), "the starter's worker", DEADLINE)
        yield Starter(client, worker, stop)
    finally:
        for gate in GATE.values():  # a failed scenario must not leave a step waiting
            gate.set()
        stop.set()
        await serving
        await client.close()


def _ready(worker: Worker, serving: asyncio.Task[None]) -> Any:
    async def ready() -> bool:
        if serving.done():
            serving.result()
            raise AssertionError("the starter's worker stopped")
        return worker.ready.is_set()

    return ready


def reasons(events: list[Any]) -> list[str]:
    return [e.reason for e in events if type(e).__name__ == "TaskDispatched"]


def test_an_eager_run_completes_in_its_starters_worker_with_no_task_queued(
    settings: Settings,
) -> None:
    async def scenario() -> None:
        clock = ManualClock(datetime.now(tz=UTC))
        async with everything(settings, clock, flow) as stack, starter(stack, settings) as started:
            client = started.client
            run_id = await client.start("three", {"order": "o-1"})
            output = await client.result(run_id, timeout=DEADLINE)
            assert output == {"order": "o-1", "done": ["charge", "reserve", "ship"]}
            history = await stack.history(run_id)
            assert reasons(history) == ["eager"]
            assert kinds(history)[-1] == "RunCompleted"
            # The start recorded the first step with the run, in one command (ADR 20).
            assert kinds(history, dispatches=True)[:4] == [
                "RunStarted",
                "TaskDispatched",
                "StepStarted",
                "StepCompleted",
            ]
            assert [e.attempt for e in history if type(e).__name__ == "StepStarted"] == [1, 1, 1]
            assert STEPS == ["charge:eager", "reserve:eager", "ship:eager"]
            # Another client hears of the end as of any run's.
            assert await stack.client.result(run_id, timeout=DEADLINE) == output
            if settings.sqlite_path is None:
                assert await queued_tasks(settings) == 0

    asyncio.run(scenario())


def test_a_keyed_start_of_a_run_that_exists_is_not_run_again(settings: Settings) -> None:
    async def scenario() -> None:
        clock = ManualClock(datetime.now(tz=UTC))
        async with everything(settings, clock, flow) as stack, starter(stack, settings) as started:
            client, worker = started.client, started.worker
            first = await client.start("three", {"order": "o-1"}, key="o-1")
            await client.result(first, timeout=DEADLINE)
            again = await client.start("three", {"order": "o-1"}, key="o-1")
            assert again == first
            assert await client.result(again, timeout=DEADLINE) == {
                "order": "o-1",
                "done": ["charge", "reserve", "ship"],
            }
            assert len(STEPS) == 3
            assert worker.reserve_eager("three")  # the slot was given back
            worker.release_eager()

    asyncio.run(scenario())


def test_an_eager_run_whose_worker_is_gone_goes_to_the_queue_when_its_lease_runs_out(
    settings: Settings,
) -> None:
    async def scenario(stack: Stack) -> None:
        async with starter(stack, settings) as started:
            run_id = await in_second_step(started, "o-2")
            # The starter's process dies in the step: nothing is given back, and from now
            # on no one answers for the run.
            await holder_dies(run_id)
        GATE["reserve"].set()
        await run_out(stack, settings, run_id)
        output = await stack.client.result(run_id, timeout=DEADLINE)
        assert output == {"order": "o-2", "done": ["charge", "reserve", "ship"]}
        assert reasons(await stack.history(run_id)) == ["eager", "eager_expired"]
        assert STEPS == ["charge:eager", "reserve:eager", "reserve:queue", "ship:queue"]

    on_a_stack(settings, scenario)


def test_a_held_eager_run_keeps_its_lease_and_a_stopping_worker_hands_it_to_the_queue(
    settings: Settings,
) -> None:
    async def scenario(stack: Stack) -> None:
        async with starter(stack, settings) as started:
            run_id = await in_second_step(started, "o-3")
            before = stack.clock.now()
            stack.clock.advance(EAGER_LEASE + timedelta(seconds=1))
            renewed = lease_renewed(stack, settings, run_id, before)
            await waiting.until(renewed, "the lease renewed", DEADLINE)
            assert reasons(await stack.history(run_id)) == ["eager"]
            # The starter's worker is told to stop while the step runs: it lets the run
            # go at its next step, to the queue at once (not when the lease ends).
            started.stop.set()
            await waiting.until(stopping(started.worker), "the worker stopping", DEADLINE)
            GATE["reserve"].set()
        output = await stack.client.result(run_id, timeout=DEADLINE)
        assert output["done"] == ["charge", "reserve", "ship"]
        assert reasons(await stack.history(run_id)) == ["eager", "eager_expired"]
        assert STEPS == ["charge:eager", "reserve:eager", "ship:queue"]

    on_a_stack(settings, scenario)


def test_a_cancel_just_after_an_eager_start_waits_for_the_step_the_start_began(
    settings: Settings,
) -> None:
    async def scenario(stack: Stack) -> None:
        async with starter(stack, settings) as started:
            GATE["charge"] = asyncio.Event()
            run_id = await started.client.start("three", {"order": "o-4"})
            await stack.client.cancel(run_id, "changed my mind")
            # The step was recorded as running by the start itself: the cancel waits.
            run = await stack.client.get(run_id)
            assert (run["status"], run["cancel_requested"]) == ("running", True)
            await waiting.until(reached("charge:eager"), "the first step", DEADLINE)
            GATE["charge"].set()
            await waiting.until(ended(stack, run_id), "the run's end", DEADLINE)
        run = await stack.client.get(run_id)
        assert run["status"] == "cancelled"
        assert run["steps"]["charge"]["status"] == "completed"
        assert STEPS == ["charge:eager"]

    on_a_stack(settings, scenario)


def test_an_eager_holder_gone_in_the_step_its_start_began_hands_it_to_the_queue(
    settings: Settings,
) -> None:
    async def scenario(stack: Stack) -> None:
        async with starter(stack, settings) as started:
            GATE["charge"] = asyncio.Event()
            run_id = await started.client.start("three", {"order": "o-5"})
            await waiting.until(reached("charge:eager"), "the first step", DEADLINE)
            await holder_dies(run_id)
        GATE["charge"].set()
        await run_out(stack, settings, run_id)
        output = await stack.client.result(run_id, timeout=DEADLINE)
        assert output == {"order": "o-5", "done": ["charge", "reserve", "ship"]}
        history = await stack.history(run_id)
        charges = [e.attempt for e in history if getattr(e, "step", None) == "charge"]
        assert charges == [1, 2, 2]  # started by the start, then by the queue's worker
        assert STEPS == ["charge:eager", "charge:queue", "reserve:queue", "ship:queue"]

    on_a_stack(settings, scenario)


async def holder_dies(run_id: str) -> None:
    """The eager run's holder stops dead: nothing is given back or answered any more."""
    [eager] = [t for t in asyncio.all_tasks() if t.get_name() == f"eager-{run_id}"]
    eager.cancel()
    await asyncio.wait({eager})


def ended(stack: Stack, run_id: str) -> Any:
    async def check() -> bool:
        return (await stack.client.get(run_id))["status"] in ("completed", "failed", "cancelled")

    return check


def on_a_stack(settings: Settings, scenario: Callable[[Stack], Awaitable[None]]) -> None:
    """Run ``scenario`` on the whole stack, its clock moved by the scenario alone."""

    async def run() -> None:
        async with everything(settings, ManualClock(datetime.now(tz=UTC)), flow) as stack:
            await scenario(stack)

    asyncio.run(run())


async def in_second_step(started: Starter, order: str) -> str:
    """An eager run of ``order``, once it runs its second step, which waits for
    ``GATE["reserve"]`` to be set."""
    GATE["reserve"] = asyncio.Event()
    run_id = await started.client.start("three", {"order": order})
    await waiting.until(reached("reserve:eager"), "the eager run's 2nd step", DEADLINE)
    return run_id


def stopping(worker: Worker) -> Any:
    async def check() -> bool:
        return worker.stopping

    return check


def reached(mark: str) -> Any:
    async def check() -> bool:
        return mark in STEPS

    return check


def lease_renewed(stack: Stack, settings: Settings, run_id: str, before: datetime) -> Any:
    """The scheduler asked, was answered, and set the lease further on."""

    async def check() -> bool:
        lease = await lease_of(stack, settings, run_id)
        return lease is not None and lease.due_at > before + EAGER_LEASE + timedelta(seconds=1)

    return check


async def lease_of(stack: Stack, settings: Settings, run_id: str) -> Lease | None:
    """The scheduler's lease of an eager run, as it stands."""
    if settings.sqlite_path is not None:
        engine = stack.client._transport.engine  # type: ignore[attr-defined]
        leases: dict[UUID, Lease] = engine._scheduler_view.leases
        return leases.get(UUID(run_id))
    query = f"SELECT run_id, due_at, cause, suspect FROM {ss.LEASES} WHERE run_id = %s"
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        row = await (await conn.execute(query, (run_id,))).fetchone()
    return Lease(*row) if row else None


async def run_out(stack: Stack, settings: Settings, run_id: str) -> None:
    """Move time past the run's lease, and past the grace its holder gets once it did
    not answer (the embedded engine gives none: it knows its holders)."""
    stack.clock.advance(EAGER_LEASE + timedelta(seconds=1))
    if settings.sqlite_path is not None:
        return

    async def suspect() -> bool:
        lease = await lease_of(stack, settings, run_id)
        return lease is None or lease.suspect

    await waiting.until(suspect, "the holder's first silence", DEADLINE)
    stack.clock.advance(LEASE_GRACE + timedelta(seconds=1))


async def queued_tasks(settings: Settings) -> int:
    async with await nats.connect(settings.nats_url) as nc:
        info = await nc.jetstream().stream_info(Names(settings.subject_prefix).tasks_stream)
    return int(info.state.messages)
