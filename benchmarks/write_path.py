"""A write command's own cost, in process: wall and CPU time per command of a 3-step run.

    .venv/bin/python -m benchmarks.write_path [--runs 400] [--eventsourcing-insert]

Runs the commands a worker sends for a sequential 3-step run (`start_run`, `load_run`,
then `start_step` and `complete_step` for each step, and `complete_run`) one by one
through `WorkflowRuns.handle`, on a fresh PostgreSQL database: no NATS, no relay. It
prints the median wall and CPU milliseconds of each command. `--eventsourcing-insert`
saves through eventsourcing's own insert instead of ledgerflow's insert function
(ADR 18), for an A/B in one place. The peer, DBOS, is measured end to end by
`benchmarks.vs_dbos`; this script shows where a ledgerflow write goes.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections import defaultdict

from infrastructure.bootstrap import bootstrap, init_database
from infrastructure.postgres.recorder import CommandLoggingRecorder
from infrastructure.postgres.schema import PostgresParams, drop_database
from infrastructure.settings import Settings
from services import commands as c
from services.workflow_runs import RunStartedReply, WorkflowRuns

STEPS = ("charge", "reserve", "ship")
WARM_UP = 50


def one_run(app: WorkflowRuns, timings: dict[str, list[tuple[float, float]]]) -> None:
    def timed(name: str, command: c.Command) -> object:
        wall, cpu = time.perf_counter(), time.process_time()
        reply = app.handle(command)
        timings[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        return reply

    started = timed("start_run", c.StartRun(workflow="bench", input={"n": 1}))
    assert isinstance(started, RunStartedReply)
    run_id = started.run_id
    timed("load_run", c.LoadRun(run_id=run_id))
    for n, step in enumerate(STEPS):
        timed("start_step", c.StartStep(run_id=run_id, step=step, attempt=1, dispatch=1))
        output = {"step": step, "n": n}
        timed("complete_step", c.CompleteStep(run_id=run_id, step=step, attempt=1, output=output))
    timed(
        "complete_run", c.CompleteRun(run_id=run_id, output={"ok": True}, after_steps=list(STEPS))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--eventsourcing-insert", action="store_true")
    args = parser.parse_args()
    params = PostgresParams.from_url(Settings().database_url)
    settings = Settings(database_url=params.url(f"ledgerflow_write_{uuid.uuid4().hex[:8]}"))
    init_database(settings)
    app = bootstrap(settings)
    try:
        recorder = app.recorder
        assert isinstance(recorder, CommandLoggingRecorder)
        recorder.uses_insert_function = not args.eventsourcing_insert
        app.register_workflow(c.RegisterWorkflow(name="bench"))
        timings: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for _ in range(WARM_UP):
            one_run(app, timings)
        timings.clear()
        for _ in range(args.runs):
            one_run(app, timings)
    finally:
        app.close()
        drop_database(settings.database_url)
    insert = "eventsourcing's insert" if args.eventsourcing_insert else "insert function"
    print(f"{args.runs} runs, {insert}; median ms per command (wall, CPU)")
    for name, pairs in timings.items():
        wall = statistics.median(w for w, _ in pairs) * 1000
        cpu = statistics.median(p for _, p in pairs) * 1000
        print(f"  {name:14s} {wall:6.3f} wall  {cpu:6.3f} CPU")
    writes = [w for name, pairs in timings.items() if name != "load_run" for w, _ in pairs]
    print(f"  write commands {statistics.median(writes) * 1000:6.3f} wall (median of all)")


if __name__ == "__main__":
    main()
