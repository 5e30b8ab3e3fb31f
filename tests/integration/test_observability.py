"""Metrics and logs of real `ledgerflow serve` and `ledgerflow worker` processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infrastructure.bootstrap import bootstrap
from infrastructure.event_log import read_after
from infrastructure.settings import Settings
from ledgerflow import Client
from tests.support import waiting
from tests.support.isolation import isolated
from tests.support.servers import free_port, stop_processes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "ledgerflow.json"
DEADLINE = 45.0
UUID_LIKE = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def settings(postgres_server_url: str) -> Iterator[Settings]:
    with isolated(postgres_server_url) as own:
        yield own


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, metric: str, **labels: str) -> float:
    """The sum of ``metric``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == metric and wanted <= ls)


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {n for e in expressions for n in re.findall(r"\bledgerflow_[a-z0-9_]+", e)}
    assert names, "the dashboard queries no ledgerflow metric"
    return names


class Processes:
    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str, metrics_port: int) -> None:
        env = {
            **os.environ,
            **self.settings.as_env(),
            "LEDGERFLOW_METRICS_PORT": str(metrics_port),
            "LEDGERFLOW_LOG_FORMAT": "auto",  # stderr is a file: JSON lines
        }
        with (self.logs / f"{name}.log").open("wb") as err:
            self.running.append(
                subprocess.Popen(
                    [sys.executable, "-m", "ledgerflow", *args],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
            )

    def log(self, name: str) -> list[dict[str, Any]]:
        text = (self.logs / f"{name}.log").read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]  # all JSON


async def scrape(port: int) -> Samples:
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    reply.raise_for_status()
    return parse(reply.text)


def test_runs_steps_and_the_pipeline_are_counted_once_by_real_processes(
    settings: Settings, tmp_path: Path
) -> None:
    serve_port, worker_port = free_port(), free_port()
    processes = Processes(settings, tmp_path)
    roles = ["--role", "commands", "--role", "relay", "--role", "projections"]
    processes.start("serve", "serve", *roles, "--role", "scheduler", metrics_port=serve_port)
    processes.start(
        "worker", "worker", "tests.integration.worker_flows:flow", metrics_port=worker_port
    )
    flaky_log = tmp_path / "attempts"

    async def scenario() -> tuple[list[str], Samples, Samples]:
        async def worker_ready() -> bool:  # registered: the command service answers too
            log = tmp_path / "worker.log"
            return log.exists() and " serves " in log.read_text()

        await waiting.until(worker_ready, "the worker", DEADLINE)
        async with await Client.connect(settings=settings) as client:
            runs = [await client.start("three-steps", {"n": n}) for n in (1, 2)]
            runs.append(await client.start("flaky", {"log": str(flaky_log)}))
            for run_id in runs:
                await client.result(run_id, DEADLINE)
        store = await asyncio.to_thread(bootstrap, settings)
        try:
            events = await asyncio.to_thread(read_after, store, 0, 100_000)
        finally:
            await asyncio.to_thread(store.close)
        tasks = sum(1 for r in events if r.qualified_type == "WorkflowRun.TaskDispatched")
        seen: dict[str, Samples] = {}

        async def all_counted() -> bool:
            seen["serve"] = serve = await scrape(serve_port)
            return (
                value(serve, "ledgerflow_runs_ended_total") == 3
                and value(serve, "ledgerflow_events_appended_total") == len(events)
                and value(serve, "ledgerflow_relay_published_total", kind="event") == len(events)
                and value(serve, "ledgerflow_relay_published_total", kind="task") == tasks
                and value(serve, "ledgerflow_projection_lag_events", projection="runs") == 0
            )

        await waiting.until(all_counted, "every run, event and task counted", DEADLINE)
        return runs, seen["serve"], await scrape(worker_port)

    try:
        runs, serve, worker = asyncio.run(scenario())
    finally:
        stop_processes(processes.running)

    # Run-level counters: by workflow, each run once.
    assert value(serve, "ledgerflow_runs_started_total", workflow="three-steps") == 2
    assert value(serve, "ledgerflow_runs_started_total", workflow="flaky") == 1
    assert (
        value(serve, "ledgerflow_runs_ended_total", workflow="three-steps", status="completed") == 2
    )
    assert value(serve, "ledgerflow_runs_ended_total", workflow="flaky", status="completed") == 1
    assert value(serve, "ledgerflow_relay_active") == 1
    assert value(serve, "ledgerflow_commands_total", name="complete_step", outcome="ok") == 7
    assert value(serve, "ledgerflow_command_seconds_count", name="start_run") == 3

    # Step counters, from the worker: the flaky step failed twice, then completed.
    flaky = {"workflow": "flaky", "step": "call"}
    assert value(worker, "ledgerflow_step_attempts_total", outcome="failed", **flaky) == 2
    assert value(worker, "ledgerflow_step_attempts_total", outcome="completed", **flaky) == 1
    for step in ("double", "add", "square"):
        labels = {"workflow": "three-steps", "step": step, "outcome": "completed"}
        assert value(worker, "ledgerflow_step_attempts_total", **labels) == 2
    assert value(worker, "ledgerflow_step_duration_seconds_count", **flaky) == 3
    assert value(worker, "ledgerflow_step_duration_seconds_sum", **flaky) > 0

    # No run id (nor any id) becomes a label value.
    for samples in (serve, worker):
        for name, pairs in samples:
            for label, text in pairs:
                assert not UUID_LIKE.search(text), f"{name}{{{label}={text!r}}}"

    # What the dashboard queries, a real scrape has.
    scraped = {name for samples in (serve, worker) for name, _ in samples}
    assert dashboard_metrics() - scraped == set()

    # JSON lines on stderr, with the run and the position of the work in hand.
    serve_lines, worker_lines = processes.log("serve"), processes.log("worker")
    assert {"commands", "relay", "projections", "scheduler"} <= {
        line["role"] for line in serve_lines
    }
    flaky_run = runs[-1]
    about = [line for line in worker_lines if line.get("run_id") == flaky_run]
    assert about and all(isinstance(line["position"], int) for line in about)
    assert {line["role"] for line in about} == {"worker"}
    assert any("replaying" in line["message"] for line in about)
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in worker_lines)
