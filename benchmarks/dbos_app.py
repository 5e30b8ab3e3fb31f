"""DBOS Transact's side of benchmarks.vs_dbos: the same workflows, driven as benchmarks.drivers.

    python -m benchmarks.dbos_app --database-url postgresql://postgres@127.0.0.1:5432/bench_dbos_x

One process holds DBOS, its workflows and their client (DBOS runs workflows in the process
that starts them), so its CPU is measured alone. Its system database is the PostgreSQL
database given (never SQLite). Workflows and steps are DBOS's synchronous kind, its default;
``in_flight`` client threads each start a run and wait for its result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# The `bench` extra installs dbos; `make typecheck` also runs where it is not installed.
from dbos import DBOS  # type: ignore[import-not-found, unused-ignore]

Workflow = Callable[[dict[str, Any]], dict[str, Any]]


def _work(n: int) -> dict[str, int]:
    return {"n": n}


def register() -> dict[str, Workflow]:
    """Register the step and both workflows with DBOS; the workflows by the harness's names."""
    work: Callable[[int], dict[str, int]] = DBOS.step(name="work")(_work)

    def three_steps(data: dict[str, Any]) -> dict[str, Any]:
        a, b, c = work(1), work(2), work(3)
        return {"sum": a["n"] + b["n"] + c["n"], "input": data}

    def twenty_steps(data: dict[str, Any]) -> dict[str, Any]:
        total = 0
        for n in range(20):
            total += work(n)["n"]
        return {"sum": total, "input": data}

    three: Workflow = DBOS.workflow(name="three_steps")(three_steps)
    twenty: Workflow = DBOS.workflow(name="twenty_steps")(twenty_steps)
    return {"three": three, "twenty": twenty}


def run_once(workflow: Workflow, n: int) -> float:
    """Start one run and wait for its result; the seconds that took."""
    started = time.perf_counter()
    result: dict[str, Any] = DBOS.start_workflow(workflow, {"n": n}).get_result()
    assert "sum" in result, result
    return time.perf_counter() - started


def runs(workflow: Workflow, count: int, in_flight: int) -> list[float]:
    if in_flight == 1:
        return [run_once(workflow, n) for n in range(count)]
    with ThreadPoolExecutor(in_flight, thread_name_prefix="client") as pool:
        return list(pool.map(lambda n: run_once(workflow, n), range(count)))


def burst(workflow: Workflow, count: int, in_flight: int) -> None:
    """Start ``count`` runs from ``in_flight`` threads; back once every start is durable."""
    with ThreadPoolExecutor(in_flight, thread_name_prefix="client") as pool:
        list(pool.map(lambda n: DBOS.start_workflow(workflow, {"n": n}), range(count)))


def handle(workflows: dict[str, Workflow], request: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    if request["op"] == "burst":
        burst(workflows["three"], request["runs"], request["in_flight"])
        return {"seconds": time.perf_counter() - started}
    latencies = runs(workflows[request["workflow"]], request["runs"], request["in_flight"])
    return {"latencies": latencies, "seconds": time.perf_counter() - started}


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True, help="DBOS's system database")
    args = parser.parse_args()
    if not args.database_url.startswith("postgresql://"):
        parser.error("DBOS must run on PostgreSQL here: give a postgresql:// URL")
    DBOS(
        config={
            "name": "ledgerflow-bench",
            "system_database_url": args.database_url,
            "log_level": "WARNING",
        }
    )
    workflows = register()
    DBOS.launch()
    try:
        for workflow in workflows.values():
            run_once(workflow, -1)  # warm up: first connections, first inserts
        reply({"ready": True, "dbos_version": _version()})
        while line := sys.stdin.readline():
            if line.strip():
                reply(handle(workflows, json.loads(line)))
    finally:
        DBOS.destroy()


def _version() -> str:
    from importlib.metadata import version

    return version("dbos")


if __name__ == "__main__":
    main()
