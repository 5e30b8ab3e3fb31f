"""Rebuild speed: events/s for each projection and for all of them, on N stored events.

    .venv/bin/python -m benchmarks.rebuild [--events 100000]

Fills a fresh database through the service (group-committed batches of realistic
commands: starts, steps, completions), then times `rebuild` from the store.
"""

from __future__ import annotations

import argparse
import time
import uuid

from infrastructure.bootstrap import bootstrap, init_database
from infrastructure.postgres.read_models import rebuild
from infrastructure.postgres.schema import PostgresParams, drop_database
from infrastructure.settings import Settings
from projections.catalog import PROJECTIONS
from services import commands as c
from services.workflow_runs import WorkflowRuns

TARGET_EVENTS_PER_SECOND = 20_000
EVENTS_PER_RUN = 8  # RunStarted, 3 x (StepStarted, StepCompleted), RunCompleted


def fill(app: WorkflowRuns, events: int) -> int:
    app.register_workflow(c.RegisterWorkflow(name="bench"))
    runs = events // EVENTS_PER_RUN
    for first in range(0, runs, 250):
        keys = [f"r-{n}" for n in range(first, min(first + 250, runs))]
        started = app.execute([c.StartRun(workflow="bench", key=k, input={"k": k}) for k in keys])
        ids = [r.run_id for r in started if hasattr(r, "run_id")]
        batch: list[c.Command] = []
        for step in ("charge", "reserve", "ship"):
            batch += [c.StartStep(run_id=i, step=step, attempt=1) for i in ids]
            batch += [
                c.CompleteStep(run_id=i, step=step, attempt=1, output={"ok": step}) for i in ids
            ]
        batch += [c.CompleteRun(run_id=i, output={"done": True}) for i in ids]
        app.execute(batch)
    return app.recorder.max_notification_id() or 0


def measure(events: int, base: Settings | None = None) -> tuple[int, dict[str, float]]:
    """Fill a fresh ``bench_rebuild_*`` database with ``events``; the head and rebuild times.

    The times are seconds, by projection name and ``"all"`` (the lockstep ``rebuild --all``).
    """
    params = PostgresParams.from_url((base or Settings()).database_url)
    settings = Settings(database_url=params.url(f"bench_rebuild_{uuid.uuid4().hex[:8]}"))
    init_database(settings)
    try:
        app = bootstrap(settings)
        try:
            started = time.perf_counter()
            head = fill(app, events)
            print(f"filled {head:,} events in {time.perf_counter() - started:.1f} s")
        finally:
            app.close()
        timings: dict[str, float] = {}
        for name in [*PROJECTIONS, None]:
            started = time.perf_counter()
            rebuild(settings, name)
            timings[name or "all"] = time.perf_counter() - started
    finally:
        drop_database(settings.database_url)
    return head, timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    head, timings = measure(args.events)
    print(f"rebuild from the store ({head:,} events):")
    for name, seconds in timings.items():
        rate = head / seconds
        print(
            f"  {name:<16} {seconds:6.2f} s  {rate:>9,.0f} events/s"
            f"  ({rate / TARGET_EVENTS_PER_SECOND:.2f}x of 20,000/s)"
        )


if __name__ == "__main__":
    main()
