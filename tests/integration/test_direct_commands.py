"""Direct commands (ADR 19): a client and a worker that apply their commands to the event
store themselves, with no ``commands`` role running, over a real PostgreSQL and NATS."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import IntegrityError, OperationalError

from domain.errors import InvalidCommandError
from infrastructure.bootstrap import bootstrap
from infrastructure.nats import command_service, relay
from infrastructure.nats.command_service import CommandService
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
            refused = "invalid start_run request: workflow: Input should be a valid string"
            with pytest.raises(InvalidCommandError, match=refused):
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


@asynccontextmanager
async def watched_service(
    settings: Settings, watch: Callable[[Sequence[Any]], None]
) -> AsyncIterator[CommandService]:
    """A direct command service whose store calls ``watch`` with each batch first (in
    the thread that applies it); ``watch`` may raise as the store would."""
    app = await asyncio.to_thread(bootstrap, settings)
    execute = app.execute

    def watched(commands: Sequence[Any]) -> Any:
        watch(commands)
        return execute(commands)

    app.execute = watched  # type: ignore[method-assign]
    service = CommandService.configured(app, settings)  # small batches inline, as ever
    await service.start(None)
    try:
        yield service
    finally:
        await service.stop()
        await asyncio.to_thread(app.close)


def send(service: CommandService, name: str, body: dict[str, Any]) -> Any:
    """The reply's future, for a request encoded as the SDK encodes it."""
    return service.submit(name, _transport.request_payload(body))


def on_loop() -> bool:
    return threading.current_thread() is threading.main_thread()


def test_commands_sent_in_one_turn_of_the_loop_share_a_batch(settings: Settings) -> None:
    """A step's completion is sent, and the workflow's next command follows from a task
    of its own in the same turn: the batch waits for that turn, not longer."""
    batches: list[list[str]] = []

    async def scenario() -> None:
        def names(commands: Sequence[Any]) -> None:
            batches.append([type(command).__name__ for command in commands])

        async with watched_service(settings, names) as service:
            await send(service, "register_workflow", {"name": "three"})
            batches.clear()
            first = send(service, "start_run", {"workflow": "three", "key": "a"})

            async def then() -> Any:
                return await send(service, "start_run", {"workflow": "three", "key": "b"})

            replies = await asyncio.gather(first, asyncio.ensure_future(then()))
            assert [reply["ok"] for reply in replies] == [True, True]
            assert batches == [["StartRun", "StartRun"]]

    asyncio.run(scenario())


def test_a_small_batch_is_applied_on_the_event_loop_and_a_larger_one_in_a_thread(
    settings: Settings,
) -> None:
    """Direct commands: a thread hop per small batch cost more than its commit."""
    seen: list[tuple[int, bool]] = []

    async def scenario() -> None:
        def where(commands: Sequence[Any]) -> None:
            seen.append((len(commands), on_loop()))

        async with watched_service(settings, where) as service:
            await send(service, "register_workflow", {"name": "three"})
            starts = [
                send(service, "start_run", {"workflow": "three", "key": str(n)}) for n in range(3)
            ]
            await asyncio.gather(*starts)
            assert seen == [(1, True), (3, False)]

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
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch on the event loop would hold it for the store's retries while the store
    is down: after a failure, the next batches run in a thread until one succeeds."""
    seen: list[bool] = []
    monkeypatch.setattr(command_service, "STORE_DOWN_SECONDS", 0.0)  # no fail-fast window

    async def scenario() -> None:
        def flaky(commands: Sequence[Any]) -> None:
            seen.append(on_loop())
            if len(seen) == 1:
                raise OperationalError("the store went away")

        async with watched_service(settings, flaky) as service:
            refused = await send(service, "register_workflow", {"name": "three"})
            assert refused["error"]["code"] == "unavailable"
            for _ in range(2):
                assert (await send(service, "register_workflow", {"name": "three"}))["ok"]
            assert seen == [True, False, True]  # inline, thread (it worked), inline
        stopped = await send(service, "register_workflow", {"name": "three"})
        assert stopped["error"]["code"] == "unavailable"

    asyncio.run(scenario())


def test_two_writers_with_their_own_caches_drive_one_run_in_turns(settings: Settings) -> None:
    """Two processes with direct commands, in effect (two services, two caches): each
    decides on its cached run, a stale one is refused by the save's version check and
    decided again on the store's state, and no event is lost or doubled."""
    conflicts: list[str] = []

    async def scenario() -> None:
        first = await _transport.DirectTransport.open(settings, "first")
        other = settings.model_copy(update={"db_pool_size": 4})  # another service
        second = await _transport.DirectTransport.open(other, "second")
        for transport in (first, second):
            count_conflicts(transport._shared.service.app, conflicts)
        try:
            await first.command("register_workflow", {"name": "three"})
            run_id = (await first.command("start_run", {"workflow": "three"}))["run_id"]
            for name, starter, completer in [
                ("charge", first, second),
                ("reserve", first, second),
                ("ship", second, first),
            ]:
                body = {"run_id": run_id, "step": name, "attempt": 1}
                await starter.command("start_step", body)
                await completer.command("complete_step", {**body, "output": name})
            end = {"run_id": run_id, "output": 3, "after_steps": ["charge", "reserve", "ship"]}
            assert (await second.command("complete_run", end))["ok"]
            run = (await first.command("load_run", {"run_id": run_id}))["run"]
        finally:
            await first.close()
            await second.close()
        assert run["status"] == "completed"
        assert {n: s["output"] for n, s in run["steps"].items()} == {
            "charge": "charge",
            "reserve": "reserve",
            "ship": "ship",
        }
        assert conflicts, "no decision was made on a stale cached run"
        kinds_ = await asyncio.to_thread(history, settings, run_id)
        assert [kinds_.count(k) for k in ("StepStarted", "StepCompleted", "RunCompleted")] == [
            3,
            3,
            1,
        ]

    asyncio.run(scenario())


def count_conflicts(app: Any, conflicts: list[str]) -> None:
    """Record each save the store refused for a version another writer took."""
    insert = app.recorder.insert_events

    def counted(*args: Any, **kwargs: Any) -> Any:
        try:
            return insert(*args, **kwargs)
        except IntegrityError:
            conflicts.append("conflict")
            raise

    app.recorder.insert_events = counted
