"""Direct commands (ADR 19): a client and a worker that apply their commands to the event
store themselves, with no ``commands`` role running, over a real PostgreSQL and NATS."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import OperationalError

from domain.errors import InvalidCommandError
from infrastructure.bootstrap import bootstrap
from infrastructure.nats import relay
from infrastructure.nats.command_service import STORE_DOWN_SECONDS, CommandService
from infrastructure.nats.names import Names
from infrastructure.settings import Settings
from ledgerflow import Client, Flow, RunContext, Worker, _transport
from ledgerflow.errors import CommandError
from tests.integration.durable_stack import DEADLINE, kinds
from tests.support import waiting
from tests.support.isolation import isolated

pytestmark = pytest.mark.integration

flow = Flow("direct")


def work(name: str) -> str:
    return name


@flow.workflow()
async def three(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    done = [await ctx.step(name, work, name) for name in ("charge", "reserve", "ship")]
    return {"order": data["order"], "done": done}


@pytest.fixture
def settings(postgres_server_url: str) -> Iterator[Settings]:
    with isolated(postgres_server_url, direct_commands=True) as own:
        yield own


@asynccontextmanager
async def no_command_service(settings: Settings) -> AsyncIterator[tuple[Client, Worker]]:
    """The relay (for queued runs and run ends) and a worker and client with direct
    commands: nothing answers the commands' NATS subjects."""
    stop = asyncio.Event()
    relaying = asyncio.create_task(relay.run(settings, stop))
    worker = Worker(flow, settings, 4)
    serving = asyncio.create_task(worker.run(stop))
    client = await Client.connect(settings=settings, worker=worker)
    try:
        await waiting.until(_ready(worker, serving), "the worker", DEADLINE)
        yield client, worker
    finally:
        stop.set()
        await serving
        await client.close()
        await relaying


def _ready(worker: Worker, serving: asyncio.Task[None]) -> Any:
    async def ready() -> bool:
        if serving.done():
            serving.result()
            raise AssertionError("the worker stopped")
        return worker.ready.is_set()

    return ready


def history(settings: Settings, run_id: str) -> list[str]:
    store = bootstrap(settings)
    try:
        return kinds(list(store.events.get(UUID(run_id))), dispatches=True)
    finally:
        store.close()


def head(settings: Settings) -> int | None:
    """The position of the store's last event."""
    store = bootstrap(settings)
    try:
        return store.recorder.max_notification_id()
    finally:
        store.close()


def test_runs_complete_with_no_command_service_eagerly_or_through_the_queue(
    settings: Settings,
) -> None:
    async def scenario() -> None:
        async with no_command_service(settings) as (client, _):
            eager = await client.start("three", {"order": "o-1"})
            assert await client.result(eager, timeout=DEADLINE) == {
                "order": "o-1",
                "done": ["charge", "reserve", "ship"],
            }
            # A client without the worker: the run goes through the relay and the queue.
            async with await Client.connect(settings=settings) as other:
                queued = await other.start("three", {"order": "o-2"})
                output = await other.result(queued, timeout=DEADLINE)
            assert output["order"] == "o-2"
            # Both share the one service of this process, and give it back when closed.
            assert [s.users for s in _transport._SharedService._open.values()] == [2]
        assert _transport._SharedService._open == {}
        eager_history = await asyncio.to_thread(history, settings, eager)
        assert eager_history[:2] == ["RunStarted", "TaskDispatched"]
        assert eager_history[-1] == "RunCompleted"
        assert (await asyncio.to_thread(history, settings, queued))[-1] == "RunCompleted"

    asyncio.run(scenario())


def test_a_keyed_start_is_applied_once(settings: Settings) -> None:
    async def scenario() -> None:
        async with no_command_service(settings) as (client, _):
            first = await client.start("three", {"order": "o-1"}, key="o-1")
            again = await client.start("three", {"order": "o-1"}, key="o-1")
            assert again == first
            await client.result(first, timeout=DEADLINE)
        assert (await asyncio.to_thread(history, settings, first)).count("RunStarted") == 1

    asyncio.run(scenario())


def test_bad_input_gets_the_command_services_structured_errors_and_changes_nothing(
    settings: Settings,
) -> None:
    async def scenario() -> None:
        async with no_command_service(settings) as (client, _):
            before = await asyncio.to_thread(head, settings)
            with pytest.raises(InvalidCommandError, match="invalid start_run request"):
                await client.command("start_run", {"workflow": 5})
            with pytest.raises(InvalidCommandError, match="unknown command"):
                await client.command("start_rnu", {"workflow": "three"})
            with pytest.raises(CommandError) as too_large:
                await client.command(
                    "start_run", {"workflow": "three", "input": "x" * (2 * 1024 * 1024)}
                )
            assert too_large.value.code == "too_large"
            assert await asyncio.to_thread(head, settings) == before

    asyncio.run(scenario())


def test_direct_commands_need_postgresql() -> None:
    with pytest.raises(ValueError, match="direct_commands needs a postgresql"):
        Settings(database_url="sqlite:///x.db", direct_commands=True)


def test_commands_sent_in_one_turn_of_the_loop_share_a_batch(settings: Settings) -> None:
    """A step's completion is sent, and the workflow's next command follows from a task
    of its own in the same turn: the batch waits for that turn, not longer."""

    async def scenario() -> None:
        app = await asyncio.to_thread(bootstrap, settings)
        batches: list[list[str]] = []
        execute = app.execute

        def counted(commands: Any) -> Any:
            batches.append([type(command).__name__ for command in commands])
            return execute(commands)

        app.execute = counted  # type: ignore[method-assign]
        service = CommandService(app, Names(settings.subject_prefix))
        await service.start(None)
        try:
            await service.submit("register_workflow", {"name": "three"})
            batches.clear()
            first = service.submit("start_run", {"workflow": "three", "key": "a"})

            async def then() -> Any:
                return await service.submit("start_run", {"workflow": "three", "key": "b"})

            second = asyncio.ensure_future(then())
            replies = await asyncio.gather(first, second)
            assert [reply["ok"] for reply in replies] == [True, True]
            assert batches == [["StartRun", "StartRun"]]
        finally:
            await service.stop()
            await asyncio.to_thread(app.close)

    asyncio.run(scenario())


def test_a_small_batch_is_applied_on_the_event_loop_and_a_larger_one_in_a_thread(
    settings: Settings,
) -> None:
    """Direct commands: a thread hop per small batch cost more than its commit."""

    async def scenario() -> None:
        app = await asyncio.to_thread(bootstrap, settings)
        threads: list[tuple[int, bool]] = []
        execute = app.execute

        def where(commands: Any) -> Any:
            threads.append((len(commands), threading.current_thread() is main))
            return execute(commands)

        main = threading.current_thread()
        app.execute = where  # type: ignore[method-assign]
        service = CommandService.configured(app, settings, inline_batch=2)
        await service.start(None)
        try:
            await service.submit("register_workflow", {"name": "three"})
            starts = [
                service.submit("start_run", {"workflow": "three", "key": str(n)}) for n in range(3)
            ]
            await asyncio.gather(*starts)
            assert threads == [(1, True), (3, False)]
        finally:
            await service.stop()
            await asyncio.to_thread(app.close)

    asyncio.run(scenario())


def test_nan_is_refused_as_over_nats_and_a_transport_closed_twice_gives_back_once(
    settings: Settings,
) -> None:
    async def scenario() -> None:
        first = await _transport.DirectTransport.open(settings, "first")
        second = await _transport.DirectTransport.open(settings, "second")
        try:
            await first.command("register_workflow", {"name": "three"})
            with pytest.raises(InvalidCommandError):
                await first.command("start_run", {"workflow": "three", "input": math.nan})
            await first.close()
            await first.close()  # e.g. `async with` and then close(): the service stays
            reply = await second.command("start_run", {"workflow": "three"})
            assert reply["ok"]
        finally:
            await second.close()
        assert _transport._SharedService._open == {}

    asyncio.run(scenario())


def test_after_a_store_failure_batches_go_to_a_thread_until_one_succeeds_there(
    settings: Settings,
) -> None:
    """A batch on the event loop would hold it for the store's retries while the store
    is down: after a failure, the next batches run in a thread until one succeeds."""

    async def scenario() -> None:
        app = await asyncio.to_thread(bootstrap, settings)
        threads: list[bool] = []
        execute, down = app.execute, [True]

        def flaky(commands: Any) -> Any:
            threads.append(threading.current_thread() is main)
            if down[0]:
                down[0] = False
                raise OperationalError("the store went away")
            return execute(commands)

        main = threading.current_thread()
        app.execute = flaky  # type: ignore[method-assign]
        service = CommandService.configured(app, settings, inline_batch=2)
        await service.start(None)
        try:
            refused = await service.submit("register_workflow", {"name": "three"})
            assert refused["error"]["code"] == "unavailable"
            await asyncio.sleep(STORE_DOWN_SECONDS)
            for _ in range(2):
                assert (await service.submit("register_workflow", {"name": "three"}))["ok"]
            assert threads == [True, False, True]  # inline, thread (it worked), inline
        finally:
            await service.stop()
            await asyncio.to_thread(app.close)
        stopped = await service.submit("register_workflow", {"name": "three"})
        assert stopped["error"]["code"] == "unavailable"

    asyncio.run(scenario())


def test_two_writers_with_their_own_caches_drive_one_run_in_turns(settings: Settings) -> None:
    """Two processes with direct commands, in effect (two services, two caches): each
    decides on its cached run, and a stale one is caught by the save and decided again
    on the store's state; no event is lost or doubled."""

    async def scenario() -> None:
        first = await _transport.DirectTransport.open(settings, "first")
        other = settings.model_copy(update={"db_pool_size": 4})  # another service
        second = await _transport.DirectTransport.open(other, "second")
        try:
            await first.command("register_workflow", {"name": "three"})
            run_id = (await first.command("start_run", {"workflow": "three"}))["run_id"]

            def step(name: str, kind: str) -> dict[str, Any]:
                body: dict[str, Any] = {"run_id": run_id, "step": name, "attempt": 1}
                return {**body, "output": name} if kind == "complete_step" else body

            for name, starter, completer in [
                ("charge", first, second),
                ("reserve", first, second),
                ("ship", second, first),
            ]:
                await starter.command("start_step", step(name, "start_step"))
                await completer.command("complete_step", step(name, "complete_step"))
            # Both at once, each on a cached run the other has moved on: a trusted batch
            # refused by the save, then decided again.
            replies = await asyncio.gather(
                first.command("load_run", {"run_id": run_id}),
                second.command(
                    "complete_run",
                    {"run_id": run_id, "output": 3, "after_steps": ["charge", "reserve", "ship"]},
                ),
            )
            assert replies[1]["ok"]
            run = (await first.command("load_run", {"run_id": run_id}))["run"]
            assert run["status"] == "completed"
            assert {n: s["output"] for n, s in run["steps"].items()} == {
                "charge": "charge",
                "reserve": "reserve",
                "ship": "ship",
            }
        finally:
            await first.close()
            await second.close()
        kinds_ = await asyncio.to_thread(history, settings, run_id)
        assert kinds_.count("StepStarted") == 3
        assert kinds_.count("StepCompleted") == 3
        assert kinds_.count("RunCompleted") == 1

    asyncio.run(scenario())
