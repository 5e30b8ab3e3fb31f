"""The scheduler on PostgreSQL and JetStream: runs move when they should, once, and no sooner."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID

import pytest

from domain.values import JSON, Concurrency, Timeouts
from infrastructure import scheduler_runner
from infrastructure.bootstrap import bootstrap
from infrastructure.event_log import read_after
from infrastructure.nats import relay
from infrastructure.postgres import read_model_schema as rs
from infrastructure.postgres import scheduler_schema as ss
from infrastructure.postgres.read_models import connect, open_pool
from infrastructure.settings import Settings
from projections.records import EventRecord
from services import commands as c
from services.clock import ManualClock
from services.workflow_runs import WorkflowRuns
from tests.support.isolation import isolated
from tests.support.waiting import until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def settings(postgres_server_url: str) -> Iterator[Settings]:
    with isolated(postgres_server_url) as own:
        ss.init_scheduler(own)  # idempotent: `db init` does it too once it is wired in
        yield own


@pytest.fixture
def clock() -> ManualClock:
    # Events carry the wall-clock time (a run's timeout counts from it): start there.
    return ManualClock(datetime.now(tz=UTC))


@pytest.fixture
def app(settings: Settings, clock: ManualClock) -> Iterator[WorkflowRuns]:
    service = bootstrap(settings, clock=clock, rand=lambda: 0.5)
    try:
        service.handle(c.RegisterWorkflow(name="flow"))
        yield service
    finally:
        service.close()


@contextlib.asynccontextmanager
async def running(
    settings: Settings, clock: ManualClock, schedulers: int = 1
) -> AsyncIterator[asyncio.Task[None]]:
    """The relay and ``schedulers`` scheduler roles in this process, stopped on exit."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(relay.run(settings, stop))]
    tasks += [
        asyncio.create_task(scheduler_runner.run(settings, stop, clock)) for _ in range(schedulers)
    ]
    watch = asyncio.create_task(_first_failure(tasks))
    try:
        yield watch
    finally:
        stop.set()
        watch.cancel()
        await asyncio.gather(*tasks)


async def _first_failure(tasks: list[asyncio.Task[None]]) -> None:
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)


# ---------------------------------------------------------------------------- helpers
def history(app: WorkflowRuns, run_id: UUID | None = None) -> list[EventRecord]:
    records = read_after(app, 0, 100_000)
    return [r for r in records if run_id is None or r.originator_id == run_id]


def types(app: WorkflowRuns, run_id: UUID) -> list[str]:
    return [r.type for r in history(app, run_id)]


def dispatches(app: WorkflowRuns, run_id: UUID) -> list[str]:
    return [str(r.data["reason"]) for r in history(app, run_id) if r.type == "TaskDispatched"]


def scalar(settings: Settings, query: str) -> Any:
    with connect(settings) as conn:
        row = conn.execute(query.format(schema=settings.db_schema)).fetchone()
    return row[0] if row else None


def timers(settings: Settings) -> int:
    return int(scalar(settings, f"SELECT count(*) FROM {{schema}}.{ss.TIMERS}"))


def settled(settings: Settings) -> bool:
    """The scheduler has decided on every event in the store."""
    with connect(settings) as conn:
        head = rs.store_head(conn, settings.db_schema)
        return ss.position(conn, settings.db_schema) >= head


async def quiet(settings: Settings, watch: asyncio.Task[None]) -> None:
    await until(lambda: asyncio.to_thread(settled, settings), "the scheduler", watch=watch)


async def has(
    app: WorkflowRuns, run_id: UUID, what: str, watch: asyncio.Task[None], count: int = 1
) -> None:
    async def found() -> bool:
        return (await asyncio.to_thread(types, app, run_id)).count(what) >= count

    await until(found, f"{count} {what} of run {run_id}", watch=watch)


async def send(app: WorkflowRuns, command: c.Command) -> Any:
    return await asyncio.to_thread(app.handle, command)


async def start(app: WorkflowRuns, workflow: str = "flow", key: str | None = None) -> UUID:
    reply = await send(app, c.StartRun(workflow=workflow, key=key))
    run_id: UUID = reply.run_id
    return run_id


# ------------------------------------------------------------------------------ tests
def test_a_started_run_is_dispatched_once(
    settings: Settings, clock: ManualClock, app: WorkflowRuns
) -> None:
    async def scenario() -> None:
        async with running(settings, clock) as watch:
            run_id = await start(app)
            await has(app, run_id, "TaskDispatched", watch)
            await quiet(settings, watch)
        assert dispatches(app, run_id) == ["start"]

    asyncio.run(scenario())


def test_a_sleep_fires_once_after_its_wake_up_time_with_two_schedulers(
    settings: Settings, clock: ManualClock, app: WorkflowRuns
) -> None:
    async def scenario() -> None:
        async with running(settings, clock, schedulers=2) as watch:
            run_id = await start(app)
            await send(app, c.StartSleep(run_id=run_id, name="nap", seconds=60))
            await quiet(settings, watch)
            assert timers(settings) == 1

            clock.advance(timedelta(seconds=59))
            with open_pool(settings, 1) as pool:  # what the poller does, at this moment
                fired = scheduler_runner.fire_due(
                    pool, settings.db_schema, clock.now(), scheduler_runner.sender(app, 10)
                )
            assert fired == 0
            assert "TimerFired" not in types(app, run_id)

            clock.advance(timedelta(seconds=2))
            await has(app, run_id, "TimerFired", watch)
            await has(app, run_id, "TaskDispatched", watch, count=2)
            await quiet(settings, watch)
            assert timers(settings) == 0
        assert types(app, run_id).count("TimerFired") == 1
        assert dispatches(app, run_id) == ["start", "timer"]

    asyncio.run(scenario())


def test_a_retry_becomes_due_and_dispatches_the_run(
    settings: Settings, clock: ManualClock, app: WorkflowRuns
) -> None:
    async def scenario() -> None:
        async with running(settings, clock) as watch:
            run_id = await start(app)
            await send(app, c.StartStep(run_id=run_id, step="charge", attempt=1))
            error = c.StepError(type="IOError", message="card network down")
            await send(app, c.FailStep(run_id=run_id, step="charge", attempt=1, error=error))
            assert "RetryScheduled" in types(app, run_id)
            await quiet(settings, watch)
            assert dispatches(app, run_id) == ["start"]

            clock.advance(timedelta(hours=1))
            await has(app, run_id, "TaskDispatched", watch, count=2)
            await quiet(settings, watch)
        assert dispatches(app, run_id) == ["start", "retry"]
        assert timers(settings) == 0

    asyncio.run(scenario())


def test_a_wait_times_out_and_the_run_moves_on(
    settings: Settings, clock: ManualClock, app: WorkflowRuns
) -> None:
    async def scenario() -> None:
        async with running(settings, clock) as watch:
            run_id = await start(app)
            await send(
                app,
                c.StartWait(run_id=run_id, name="shipped", event_name="ship", timeout_seconds=30),
            )
            await quiet(settings, watch)
            assert "WaitTimedOut" not in types(app, run_id)
            clock.advance(timedelta(seconds=31))
            await has(app, run_id, "WaitTimedOut", watch)
            await has(app, run_id, "TaskDispatched", watch, count=2)
        assert dispatches(app, run_id) == ["start", "wait_timeout"]

    asyncio.run(scenario())


def test_an_event_starts_each_triggered_workflow_once_and_wakes_only_matching_waits(
    settings: Settings, clock: ManualClock, app: WorkflowRuns
) -> None:
    for name, triggers in (("bill", ["order.placed"]), ("pack", ["order.placed", "x"])):
        app.handle(c.RegisterWorkflow(name=name, triggers=triggers))
    app.handle(c.RegisterWorkflow(name="other", triggers=["order.cancelled"]))

    async def scenario() -> UUID:
        async with running(settings, clock) as watch:
            waiting: dict[int, UUID] = {}
            for order in (1, 2):
                run_id = await start(app, key=f"order-{order}")
                match: dict[str, JSON] = {"order_id": order}
                await send(
                    app,
                    c.StartWait(
                        run_id=run_id, name="placed", event_name="order.placed", match=match
                    ),
                )
                waiting[order] = run_id
            await quiet(settings, watch)

            sent = await send(app, c.SendEvent(name="order.placed", data={"order_id": 1}))
            event_id: UUID = sent.event_id
            await has(app, waiting[1], "TaskDispatched", watch, count=2)

            async def triggered() -> bool:
                event = await asyncio.to_thread(app.get_inbound_event, event_id)
                return set(event.triggered) == {"bill", "pack"}

            await until(triggered, "both triggered runs", watch=watch)
            await quiet(settings, watch)
        assert dispatches(app, waiting[1]) == ["start", "event"]
        assert "EventReceived" not in types(app, waiting[2])
        assert app.get_inbound_event(event_id).woken == {(waiting[1], "placed")}
        return event_id

    event_id = asyncio.run(scenario())

    # The scheduler crashed after sending its commands, before committing its position:
    # the Received event is decided on again, and changes nothing.
    received = next(r for r in history(app, event_id) if r.type == "Received")
    with connect(settings) as conn:
        ss.set_position(conn, settings.db_schema, received.prev_position)
        read = partial(read_after, app)
        scheduler_runner.catch_up(conn, settings.db_schema, read, scheduler_runner.sender(app, 100))
    started = [r for r in history(app) if r.type == "RunStarted"]
    assert sorted(str(r.data["workflow"]) for r in started if r.data["triggered_by"]) == [
        "bill",
        "pack",
    ]
    triggered = app.get_inbound_event(event_id).triggered
    for workflow, run_id in triggered.items():
        assert app.get_run(run_id).triggered_by == event_id
        assert [r.type for r in history(app, run_id)].count("TaskDispatched") == 1, workflow


def test_a_childs_end_resolves_its_parent(
    settings: Settings, clock: ManualClock, app: WorkflowRuns
) -> None:
    app.handle(c.RegisterWorkflow(name="invoice"))

    async def scenario() -> None:
        async with running(settings, clock) as watch:
            parent = await start(app)
            await send(app, c.StartChild(run_id=parent, name="invoice", workflow="invoice"))
            child = app.get_run(parent).children["invoice"].run_id
            await has(app, child, "TaskDispatched", watch)
            await send(app, c.CompleteRun(run_id=child, output={"number": 7}))
            await has(app, parent, "ChildCompleted", watch)
            await has(app, parent, "TaskDispatched", watch, count=2)
        assert app.get_run(parent).children["invoice"].output == {"number": 7}
        assert dispatches(app, parent) == ["start", "child"]

    asyncio.run(scenario())


def test_a_run_that_exceeds_its_timeout_is_timed_out(
    settings: Settings, clock: ManualClock, app: WorkflowRuns
) -> None:
    app.handle(c.RegisterWorkflow(name="quick", timeouts=Timeouts(run=120)))

    async def scenario() -> None:
        async with running(settings, clock) as watch:
            run_id = await start(app, "quick")
            await has(app, run_id, "TaskDispatched", watch)
            await quiet(settings, watch)
            assert timers(settings) == 1
            clock.advance(timedelta(seconds=180))
            await has(app, run_id, "RunTimedOut", watch)
            await quiet(settings, watch)
            assert timers(settings) == 0

    asyncio.run(scenario())


def test_a_restarted_scheduler_misses_nothing(
    settings: Settings, clock: ManualClock, app: WorkflowRuns
) -> None:
    async def scenario() -> None:
        async with running(settings, clock) as watch:
            first = await start(app)
            await has(app, first, "TaskDispatched", watch)
        later = [await start(app) for _ in range(3)]  # while the scheduler is down
        await send(app, c.StartSleep(run_id=first, name="nap", seconds=5))
        async with running(settings, clock) as watch:
            for run_id in later:
                await has(app, run_id, "TaskDispatched", watch)
            await quiet(settings, watch)
            clock.advance(timedelta(seconds=6))
            await has(app, first, "TimerFired", watch)
            await has(app, first, "TaskDispatched", watch, count=2)
            await quiet(settings, watch)
        assert dispatches(app, first) == ["start", "timer"]
        assert all(dispatches(app, run_id) == ["start"] for run_id in later)

    asyncio.run(scenario())


def slots(settings: Settings) -> dict[str, int]:
    with connect(settings) as conn:
        rows = conn.execute(
            f"SELECT state, count(*) FROM {settings.db_schema}.{ss.SLOTS} GROUP BY state"
        ).fetchall()
    return {str(r[0]): int(r[1]) for r in rows}


def test_a_concurrency_limit_holds_runs_back_and_releases_them_with_two_schedulers(
    settings: Settings, clock: ManualClock, app: WorkflowRuns
) -> None:
    async def scenario() -> None:
        await send(app, c.RegisterWorkflow(name="limited", concurrency=Concurrency(limit=2)))
        async with running(settings, clock, schedulers=2) as watch:
            ids = [await start(app, "limited") for _ in range(4)]
            for run_id in ids[:2]:
                await has(app, run_id, "TaskDispatched", watch)
            await quiet(settings, watch)
            assert [dispatches(app, run_id) for run_id in ids] == [["start"], ["start"], [], []]
            assert slots(settings) == {"held": 2, "queued": 2}

            await send(app, c.CancelRun(run_id=ids[1]))
            await has(app, ids[2], "TaskDispatched", watch)
            await quiet(settings, watch)
            assert dispatches(app, ids[2]) == ["released"] and dispatches(app, ids[3]) == []
            cancelled = next(r for r in history(app, ids[1]) if r.type == "RunCancelled")
            released = next(r for r in history(app, ids[2]) if r.type == "TaskDispatched")
            assert released.data["cause"] == cancelled.position

            for run_id in (ids[0], ids[2]):
                await send(app, c.CancelRun(run_id=run_id))
            await has(app, ids[3], "TaskDispatched", watch)
            await quiet(settings, watch)
        assert dispatches(app, ids[3]) == ["released"]
        assert slots(settings) == {"held": 1}

    asyncio.run(scenario())
