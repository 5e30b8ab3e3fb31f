"""The whole durable stack in one process: commands, relay, scheduler on a manual clock, worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx
import nats

from infrastructure import projection_runner, scheduler_runner
from infrastructure.bootstrap import bootstrap
from infrastructure.embedded.dev import embedded
from infrastructure.embedded.transport import EngineTransport
from infrastructure.http import app as http_app
from infrastructure.nats import relay
from infrastructure.nats.command_service import CommandService
from infrastructure.nats.names import Names
from infrastructure.settings import Settings
from ledgerflow import Client, Flow, Worker, _transport
from ledgerflow._ports import Transport
from services.clock import ManualClock
from services.workflow_runs import WorkflowRuns
from tests.support import waiting
from tests.support.servers import free_port

DEADLINE = 30.0
ENDED = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class Stack:
    """What a test drives: a client, the store (for histories) and the shared clock."""

    client: Client
    store: WorkflowRuns
    clock: ManualClock
    connect: Callable[[], Awaitable[Transport]]
    """A new SDK connection to this backend (another process's, in effect)."""

    async def until_run(
        self, run_id: str, condition: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        """The run's snapshot once ``condition`` holds for it (fails after DEADLINE s)."""
        seen: dict[str, Any] = {}

        async def holds() -> bool:
            seen.clear()
            seen.update(await self.client.get(run_id))
            return bool(condition(seen))

        await waiting.until(holds, what, DEADLINE)
        return seen

    async def ended(self, run_id: str) -> dict[str, Any]:
        return await self.until_run(run_id, lambda r: r["status"] in ENDED, "the run's end")

    async def history(self, run_id: str) -> list[Any]:
        """The run's domain events, as stored."""
        return await asyncio.to_thread(lambda: list(self.store.events.get(UUID(run_id))))


def kinds(events: list[Any], *, dispatches: bool = False) -> list[str]:
    """Event type names; hand-offs (TaskDispatched) are left out unless asked for."""
    names = [type(e).__name__ for e in events]
    return names if dispatches else [n for n in names if n != "TaskDispatched"]


@asynccontextmanager
async def everything(
    settings: Settings, clock: ManualClock, flow: Flow, ack_wait: float = 5.0
) -> AsyncIterator[Stack]:
    """Commands, relay, scheduler and a worker serving ``flow``, all in this process:
    over PostgreSQL and NATS, or on the embedded engine when ``settings`` names a SQLite
    store (the same scenarios run on both, so the two backends never drift apart).

    The command service and the scheduler read the same ``clock``, as every process reads
    the one system clock in production: due times are set and checked on one time line,
    so a test moves time instead of sleeping.
    """
    if settings.sqlite_path is not None:
        api = settings.model_copy(update={"api_port": free_port()})
        async with embedded(api, [flow], concurrency=4, clock=clock, ack_wait=ack_wait) as dev:
            yield Stack(dev.client, dev.engine.store, clock, engine_transport(dev.engine))
        return
    async with stack(settings, flow, clock=clock, ack_wait=ack_wait) as running:
        yield running


@asynccontextmanager
async def stack(
    settings: Settings,
    flow: Flow | None,
    *,
    clock: ManualClock | None = None,
    scheduler: bool = True,
    ack_wait: float = 5.0,
) -> AsyncIterator[Stack]:
    """The command service, the relay, and optionally the scheduler and a worker.

    Without the scheduler, a test plays its part itself (see test_worker.Scheduler).
    """
    stop = asyncio.Event()
    store = await asyncio.to_thread(bootstrap, settings, clock=clock)
    nc = await nats.connect(settings.nats_url)
    service = CommandService(store, Names(settings.subject_prefix))
    await service.start(nc)
    roles = [asyncio.create_task(relay.run(settings, stop), name="relay")]
    if scheduler:
        follow = scheduler_runner.run(settings, stop, clock=clock)
        roles.append(asyncio.create_task(follow, name="scheduler"))
    worker = Worker(flow, settings, 4, ack_wait=ack_wait) if flow is not None else None
    if worker is not None:
        roles.append(asyncio.create_task(worker.run(stop), name="worker"))
    # Direct commands (ADR 19): the client and worker apply theirs with this store, on
    # the test's clock, as the command service does with the requests of other processes.
    direct = (
        await _transport.DirectTransport.open(settings, "ledgerflow-test", app=store)
        if settings.direct_commands
        else None
    )
    client = await Client.connect(settings=settings)
    try:
        if worker is not None:
            await waiting.until(_ready(worker, roles), "the worker", DEADLINE)
        yield Stack(client, store, clock or ManualClock(), _nats_transport(settings))
    finally:
        stop.set()
        results = await asyncio.gather(*roles, return_exceptions=True)
        await client.close()
        if direct is not None:
            await direct.close()
        await service.stop()
        await nc.close()
        await asyncio.to_thread(store.close)
    assert [r for r in results if r is not None] == []


def _nats_transport(settings: Settings) -> Callable[[], Awaitable[Transport]]:
    async def connect() -> Transport:
        return await _transport.Transport.connect(
            settings.nats_url, settings.subject_prefix, "ledgerflow-test"
        )

    return connect


def engine_transport(engine: Any) -> Callable[[], Awaitable[Transport]]:
    async def connect() -> Transport:
        return EngineTransport(engine)

    return connect


def _ready(worker: Worker, roles: list[asyncio.Task[None]]) -> Callable[[], Any]:
    async def ready() -> bool:
        for role in roles:
            if role.done():
                role.result()
                raise AssertionError(f"{role.get_name()} stopped")
        return worker.ready.is_set()

    return ready


@dataclass(frozen=True)
class ApiStack:
    """A durable stack with its HTTP API (and, on PostgreSQL, the projections role)."""

    stack: Stack
    api_url: str


@asynccontextmanager
async def with_api(
    settings: Settings, clock: ManualClock, flow: Flow, ack_wait: float = 5.0
) -> AsyncIterator[ApiStack]:
    """:func:`everything` plus the read models and the API on a free loopback port: the
    embedded engine's own, or ``serve``'s projections and api roles over PostgreSQL."""
    settings = settings.model_copy(update={"api_port": free_port()})
    if settings.sqlite_path is not None:
        async with embedded(settings, [flow], concurrency=4, clock=clock, ack_wait=ack_wait) as dev:
            connect = engine_transport(dev.engine)
            yield ApiStack(Stack(dev.client, dev.engine.store, clock, connect), dev.api_url)
        return
    async with stack(settings, flow, clock=clock, ack_wait=ack_wait) as running:
        stop = asyncio.Event()
        roles = [
            asyncio.create_task(projection_runner.run(settings, stop), name="projections"),
            asyncio.create_task(http_app.run(settings, stop), name="api"),
        ]
        api_url = f"http://{settings.api_host}:{settings.api_port}"
        try:
            await waiting.until(_answers(api_url, roles), "the API", DEADLINE)
            yield ApiStack(running, api_url)
        finally:
            stop.set()
            results = await asyncio.gather(*roles, return_exceptions=True)
        assert [r for r in results if r is not None] == []


def _answers(api_url: str, roles: list[asyncio.Task[None]]) -> Callable[[], Any]:
    async def answers() -> bool:
        for role in roles:
            if role.done():
                role.result()
                raise AssertionError(f"{role.get_name()} stopped")
        try:
            async with httpx.AsyncClient(base_url=api_url, timeout=1.0) as http:
                return (await http.get("/healthz")).status_code == 200
        except httpx.HTTPError:
            return False

    return answers
