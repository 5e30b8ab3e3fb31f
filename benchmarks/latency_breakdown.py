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
import statistics
from collections import defaultdict
from typing import Any
from uuid import UUID

from benchmarks.vs_dbos import TWO_PROCESSES, serve_groups
from benchmarks.workflows import running_ledgerflow, wait_ready
from infrastructure.bootstrap import bootstrap
from infrastructure.settings import Settings
from ledgerflow import Client
from services.workflow_runs import WorkflowRuns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--serve", default=TWO_PROCESSES, help="serve processes' roles, as vs_dbos")
    args = parser.parse_args()
    with running_ledgerflow(serve=serve_groups(args.serve)) as (settings, _):
        run_ids = asyncio.run(sequential_runs(settings, args.runs))
        app = bootstrap(settings)
        try:
            gaps, totals = hops(app, run_ids)
        finally:
            app.close()
    print(f"3-step workflow, {args.runs} sequential runs: median ms between stored events")
    for hop, values in gaps.items():
        print(f"  {hop:<40} {statistics.median(values):7.1f} ms  (n={len(values)})")
    print(f"  {'first event -> last event':<40} {statistics.median(totals):7.1f} ms")


async def sequential_runs(settings: Settings, runs: int) -> list[str]:
    async with await Client.connect(settings=settings) as client:
        await wait_ready(client)
        ids = []
        for _ in range(runs):
            run_id = await client.start("three_steps", {})
            await client.result(run_id, timeout=30)
            ids.append(str(run_id))
        return ids


def hops(app: WorkflowRuns, run_ids: list[str]) -> tuple[dict[str, list[float]], list[float]]:
    """Milliseconds between consecutive stored events, by transition; and per whole run."""
    gaps: dict[str, list[float]] = defaultdict(list)
    totals = []
    for run_id in run_ids:
        events: list[Any] = list(app.events.get(UUID(run_id)))  # aggregate events
        for before, after in itertools.pairwise(events):
            hop = f"{type(before).__name__} -> {type(after).__name__}"
            gaps[hop].append((after.timestamp - before.timestamp).total_seconds() * 1000)
        totals.append((events[-1].timestamp - events[0].timestamp).total_seconds() * 1000)
    return gaps, totals


if __name__ == "__main__":
    main()
