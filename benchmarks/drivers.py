"""The client process of each system in benchmarks.vs_dbos: it runs what stdin asks, one per line.

    python -m benchmarks.drivers            # ledgerflow's client, LEDGERFLOW_* from the env

With ``BENCH_EAGER_CONCURRENCY=N`` set, ledgerflow's client process runs a worker of its
own (N slots) and starts runs eagerly (ADR 17), as a DBOS application runs its workflows
in the process that starts them; runs beyond its slots go through the queue as before.

It says ``{"ready": true}`` once a run of each workflow went through, then answers each
request line with one JSON line:

- ``{"op": "runs", "workflow": "three"|"twenty", "runs": N, "in_flight": K}``:
  N runs, K at a time, each waited for; ``{"latencies": [s, ...], "seconds": s}``.
- ``{"op": "burst", "runs": N, "in_flight": K}``: N starts, K at a time, not waited for;
  ``{"seconds": s}`` once every start was accepted (durably).

End of stdin ends the process. benchmarks.dbos_app speaks the same protocol for DBOS, so the
harness measures each system's client CPU in a process of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from benchmarks.flows import flow
from benchmarks.workflows import in_flight, sequential, wait_ready
from infrastructure.settings import Settings
from ledgerflow import Client, Worker
from ledgerflow.errors import CommandError

WORKFLOWS = {"three": "three_steps", "twenty": "twenty_steps"}
"""The harness's workflow names, and ledgerflow's (benchmarks.flows)."""

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def serve_requests(handle: Handler) -> None:
    """Answer each line of stdin with ``handle``'s reply, until stdin ends."""
    loop = asyncio.get_running_loop()
    reply({"ready": True})
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line.strip():
            reply(await handle(json.loads(line)))


@contextlib.asynccontextmanager
async def eager_worker(settings: Settings) -> AsyncIterator[Worker | None]:
    """The worker in the client's process (BENCH_EAGER_CONCURRENCY), or None."""
    slots = int(os.environ.get("BENCH_EAGER_CONCURRENCY", "0"))
    if slots <= 0:
        yield None
        return
    worker, stop = Worker(flow, settings, slots), asyncio.Event()
    serving = asyncio.create_task(worker.run(stop))
    try:
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait({ready, serving}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # it failed: say why
        yield worker
    finally:
        stop.set()
        await serving


async def ledgerflow_driver() -> None:
    settings = Settings()
    async with (
        eager_worker(settings) as worker,
        await Client.connect(settings=settings, worker=worker) as client,
    ):
        await wait_ready(client)  # one three-step run through the service and the worker
        await client.result(await client.start(WORKFLOWS["twenty"], {"warm": True}), timeout=30)

        async def handle(request: dict[str, Any]) -> dict[str, Any]:
            started = time.perf_counter()
            if request["op"] == "burst":
                await burst(client, request["runs"], request["in_flight"])
                return {"seconds": time.perf_counter() - started}
            workflow, runs, limit = (
                WORKFLOWS[request["workflow"]],
                request["runs"],
                request["in_flight"],
            )
            if limit == 1:
                latencies = await sequential(client, runs, workflow)
            else:
                latencies = await in_flight(client, runs, limit, workflow)
            return {"latencies": latencies, "seconds": time.perf_counter() - started}

        await serve_requests(handle)


async def burst(client: Client, runs: int, limit: int) -> None:
    """Start ``runs`` three-step runs, ``limit`` requests at a time; keyed, so a retry is safe."""
    gate = asyncio.Semaphore(limit)

    async def one(n: int) -> None:
        async with gate:
            for attempt in range(5):
                try:
                    await client.start(WORKFLOWS["three"], {"n": n}, key=f"burst-{n}")
                    return
                except CommandError as e:
                    if e.code != "unavailable" or attempt == 4:
                        raise

    await asyncio.gather(*(one(n) for n in range(runs)))


if __name__ == "__main__":
    asyncio.run(ledgerflow_driver())
