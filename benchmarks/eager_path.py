"""A run's own path, alone: eager 3-step runs with direct commands, nothing else running.

    .venv/bin/python -m benchmarks.eager_path [--runs 1000] [--trusting-batch N]

A client and a worker in this process (ADR 17 and ADR 19) run the benchmark's 3-step
workflow one run at a time on a fresh database of LEDGERFLOW_DATABASE_URL's server, with
no `serve` process (no relay, read models or scheduler to share the CPU with), and print
the median start-to-result latency, this process's CPU per run, and its command batches
per run. It shows the floor under `benchmarks.vs_dbos`'s sequential figure; DBOS's is
measured there. `--trusting-batch` sets how many step commands a batch may decide on the
cached run (`services.workflow_runs.TRUSTING_BATCH`; 1 is the behaviour before batches
could), for an A/B in one place.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections import Counter
from typing import Any

from benchmarks.flows import flow
from infrastructure.bootstrap import init_database
from infrastructure.nats.command_service import CommandService
from infrastructure.postgres.schema import PostgresParams, drop_database
from infrastructure.settings import Settings
from ledgerflow import Client, Worker
from services import workflow_runs

WARM_UP = 50


async def measure(settings: Settings, runs: int) -> tuple[list[float], float, Counter[int]]:
    """Latencies (s) after the warm-up, CPU seconds per run, and batch sizes seen."""
    batches: Counter[int] = Counter()
    execute = CommandService._execute

    async def counted(self: CommandService, batch: list[Any]) -> Any:
        batches[len(batch)] += 1
        return await execute(self, batch)

    CommandService._execute = counted  # type: ignore[method-assign]
    worker, stop = Worker(flow, settings, 10), asyncio.Event()
    serving = asyncio.create_task(worker.run(stop))
    try:
        await worker.ready.wait()
        async with await Client.connect(settings=settings, worker=worker) as client:
            latencies = []
            for n in range(WARM_UP + runs):
                if n == WARM_UP:
                    batches.clear()
                    cpu = time.process_time()
                started = time.perf_counter()
                await client.result(await client.start("three_steps", {"n": n}), timeout=30)
                latencies.append(time.perf_counter() - started)
            cpu = time.process_time() - cpu
    finally:
        stop.set()
        await serving
        CommandService._execute = execute  # type: ignore[method-assign]
    return latencies[WARM_UP:], cpu / runs, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--trusting-batch", type=int, default=workflow_runs.TRUSTING_BATCH)
    args = parser.parse_args()
    workflow_runs.TRUSTING_BATCH = args.trusting_batch
    params = PostgresParams.from_url(Settings().database_url)
    settings = Settings(
        database_url=params.url(f"ledgerflow_eager_{uuid.uuid4().hex[:8]}"),
        subject_prefix=f"bench{uuid.uuid4().hex[:8]}",
        direct_commands=True,
    )
    init_database(settings)
    try:
        latencies, cpu, batches = asyncio.run(measure(settings, args.runs))
    finally:
        drop_database(settings.database_url)
    per_run = sum(batches.values()) / args.runs
    sizes = ", ".join(f"{size}: {count}" for size, count in sorted(batches.items()))
    print(
        f"{args.runs} eager 3-step runs, direct commands, "
        f"trusting batches of {args.trusting_batch}: "
        f"p50 {statistics.median(latencies) * 1000:.2f} ms, "
        f"p99 {statistics.quantiles(latencies, n=100)[98] * 1000:.2f} ms, "
        f"CPU {cpu * 1000:.2f} ms/run, {per_run:.2f} command batches/run (by size {sizes})"
    )


if __name__ == "__main__":
    main()
