"""Where a workflow's latency goes: median gaps between its consecutive stored events.

    .venv/bin/python -m benchmarks.latency_breakdown [--runs 50]

Runs the 3-step benchmark workflow sequentially on `ledgerflow serve` + a worker (as
benchmarks/workflows.py does), then reads each run's history from the store and reports,
for each transition (e.g. RunStarted -> TaskDispatched), the median time between the two
events' timestamps: the hops issue 6 has to shorten.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import uuid
from collections import defaultdict
from uuid import UUID

from benchmarks.workflows import wait_ready
from infrastructure.bootstrap import bootstrap, init_database
from infrastructure.postgres.schema import PostgresParams, drop_database
from infrastructure.settings import Settings
from ledgerflow import Client
from tests.support.servers import free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    params = PostgresParams.from_url(Settings().database_url)
    settings = Settings(
        database_url=params.url(f"ledgerflow_bench_{uuid.uuid4().hex[:8]}"),
        subject_prefix=f"bench{uuid.uuid4().hex[:6]}",
        api_port=free_port(),
    )
    init_database(settings)
    env = {
        **os.environ,
        "LEDGERFLOW_DATABASE_URL": settings.database_url,
        "LEDGERFLOW_SUBJECT_PREFIX": settings.subject_prefix,
        "LEDGERFLOW_API_PORT": str(settings.api_port),
    }
    quiet = ["--log-level", "warning"]
    processes = [
        subprocess.Popen([sys.executable, "-m", "ledgerflow", "serve", *quiet], env=env),
        subprocess.Popen(
            [sys.executable, "-m", "ledgerflow", "worker", "benchmarks.flows:flow", *quiet],
            env=env,
        ),
    ]

    async def measure() -> list[str]:
        async with await Client.connect(settings=settings) as client:
            await wait_ready(client)
            ids = []
            for _ in range(args.runs):
                run_id = await client.start("three_steps", {})
                await client.result(run_id, timeout=30)
                ids.append(run_id)
            return ids

    try:
        run_ids = asyncio.run(measure())
        app = bootstrap(settings)
        gaps: dict[str, list[float]] = defaultdict(list)
        totals = []
        for run_id in run_ids:
            events = list(app.events.get(UUID(str(run_id))))
            for before, after in itertools.pairwise(events):
                hop = f"{type(before).__name__} -> {type(after).__name__}"
                gaps[hop].append((after.timestamp - before.timestamp).total_seconds() * 1000)
            totals.append((events[-1].timestamp - events[0].timestamp).total_seconds() * 1000)
        app.close()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        drop_database(settings.database_url)
    print(f"3-step workflow, {args.runs} sequential runs: median ms between stored events")
    for hop, values in gaps.items():
        print(f"  {hop:<40} {statistics.median(values):7.1f} ms  (n={len(values)})")
    print(f"  {'first event -> last event':<40} {statistics.median(totals):7.1f} ms")


if __name__ == "__main__":
    main()
