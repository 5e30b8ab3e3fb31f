"""``ledgerflow dev``: the engine, the API and UI, and workers for the given flows, in one
process with zero external services."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from infrastructure.embedded.engine import Engine
from infrastructure.embedded.queries import MemoryQueries
from infrastructure.embedded.transport import EngineGateway, EngineRebuilder, EngineTransport
from infrastructure.http.app import create_app, serve_app
from infrastructure.settings import Settings
from ledgerflow.client import Client
from ledgerflow.flow import Flow
from ledgerflow.worker import Worker
from services.clock import Clock

log = logging.getLogger("ledgerflow.dev")

READY_TIMEOUT = 10.0
"""Seconds the API and the workers get to come up."""


@dataclass(frozen=True)
class DevStack:
    """What a running ``dev`` offers: the engine, an SDK client, and the API's address."""

    engine: Engine
    client: Client
    api_url: str

    @property
    def ui_url(self) -> str:
        return f"{self.api_url}/ui/"


@contextlib.asynccontextmanager
async def embedded(
    settings: Settings,
    flows: Sequence[Flow] = (),
    *,
    concurrency: int = 10,
    clock: Clock | None = None,
    ack_wait: float = 30.0,
) -> AsyncIterator[DevStack]:
    """Run everything until the block ends: the store is ``settings.database_url``
    (``sqlite:///...``), the API listens on ``settings.api_host:api_port``."""
    engine = Engine(settings, clock=clock)
    await engine.start()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        app = create_app(
            settings,
            queries=MemoryQueries(engine),
            store=engine.store,
            commands=EngineGateway(engine),
            rebuilder=EngineRebuilder(engine),
        )
        tasks.append(
            asyncio.create_task(
                serve_app(app, settings.api_host, settings.api_port, stop), name="dev-api"
            )
        )
        api_url = f"http://{settings.api_host}:{settings.api_port}"
        workers = [
            Worker(
                flow, settings, concurrency, ack_wait=ack_wait, transport=EngineTransport(engine)
            )
            for flow in flows
        ]
        tasks.extend(asyncio.create_task(w.run(stop), name="dev-worker") for w in workers)
        await _ready(api_url, workers, tasks)
        yield DevStack(engine, Client(EngineTransport(engine)), api_url)
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await engine.close()
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures and not isinstance(failures[0], asyncio.CancelledError):
            raise failures[0]


async def _ready(
    api_url: str, workers: Sequence[Worker], tasks: Sequence[asyncio.Task[None]]
) -> None:
    """Return once the API answers and every worker has registered its workflows."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    async with httpx.AsyncClient(base_url=api_url, timeout=1.0) as http:
        while True:
            for task in tasks:
                if task.done():
                    task.result()  # a port in use, a worker that failed: say so
                    raise RuntimeError(f"{task.get_name()} stopped while starting")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/healthz")).status_code == 200 and all(
                    w.ready.is_set() for w in workers
                ):
                    return
            if loop.time() > deadline:
                raise TimeoutError(f"ledgerflow dev did not come up within {READY_TIMEOUT:g} s")
            await asyncio.sleep(0.05)


def parse_start(spec: str) -> tuple[str, Any]:
    """``WORKFLOW`` or ``WORKFLOW=JSON`` (a ``--start`` option): the name and its input."""
    name, sep, raw = spec.partition("=")
    if not name:
        raise ValueError(f"--start {spec!r}: expected WORKFLOW or WORKFLOW=JSON")
    if not sep:
        return name, None
    try:
        return name, json.loads(raw)
    except ValueError as e:
        raise ValueError(f"--start {spec!r}: the input is not JSON ({e})") from None


def banner(dev: DevStack, settings: Settings, flows: Sequence[Flow]) -> list[str]:
    """What ``ledgerflow dev`` prints once it is up: where to look, what to try."""
    names = [w.name for flow in flows for w in flow]
    api = f"--api-url {dev.api_url} " if settings.api_port != 8080 else ""
    first = names[0] if names else "WORKFLOW"
    return [
        f"ledgerflow dev is up (store {settings.sqlite_path})",
        f"  UI    {dev.ui_url}",
        f"  API   {dev.api_url}/docs",
        f"  workflows: {', '.join(names) or 'none (pass MODULE:FLOW)'}",
        "Try:",
        f"  ledgerflow {api}start {first} --input '{{}}' --wait",
        f"  ledgerflow {api}runs list",
        f'  ledgerflow {api}send order.confirmed --data \'{{"order_id": "A1"}}\'',
        "Ctrl-C stops it; runs carry on where they were when it starts again.",
    ]


async def run_dev(
    settings: Settings,
    flows: Sequence[Flow],
    starts: Sequence[tuple[str, Any]] = (),
    *,
    concurrency: int = 10,
    say: Callable[[str], None] = print,
) -> None:
    """``ledgerflow dev``: run until SIGINT or SIGTERM, starting ``starts`` once up."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with embedded(settings, flows, concurrency=concurrency) as dev:
        for line in banner(dev, settings, flows):
            say(line)
        for workflow, data in starts:
            run_id = await dev.client.start(workflow, data)
            say(f"started {workflow}: {dev.ui_url}runs/{run_id}")
        await stop.wait()
        say("stopping: runs in hand are handed back, and resume at the next start")
