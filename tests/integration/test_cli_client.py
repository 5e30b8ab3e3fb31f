"""The CLI as users run it, against `ledgerflow serve` and a worker, each its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from infrastructure.settings import Settings
from tests.integration.cli_flows import NAMES
from tests.support.isolation import isolated
from tests.support.servers import free_port, stop_processes

pytestmark = pytest.mark.integration

LEDGERFLOW = str(Path(sys.executable).parent / "ledgerflow")
STARTUP = 60.0
"""Seconds the service and the worker get to answer (two cores shared with other work)."""


@dataclass
class Stack:
    settings: Settings
    env: dict[str, str]
    api: httpx.Client


@pytest.fixture(scope="module")
def stack(postgres_server_url: str) -> Iterator[Stack]:
    """`ledgerflow serve` (every role) and a worker for cli_flows, on a database of their own."""
    with isolated(postgres_server_url, api_port=free_port()) as settings:
        env = {
            **os.environ,
            **settings.as_env(),
        }
        env.pop("LEDGERFLOW_API_URL", None)
        quiet = ["--log-level", "warning"]
        processes = [
            subprocess.Popen([LEDGERFLOW, "serve", *quiet], env=env),
            subprocess.Popen(
                [LEDGERFLOW, "worker", "tests.integration.cli_flows:flow", *quiet], env=env
            ),
        ]
        api = httpx.Client(base_url=settings.api_client_url, timeout=10)
        try:
            _wait_until_ready(api, processes)
            yield Stack(settings, env, api)
        finally:
            api.close()
            stop_processes(processes)


def _wait_until_ready(api: httpx.Client, processes: list[subprocess.Popen[bytes]]) -> None:
    def ready() -> bool:
        try:
            workflows = api.get("/workflows")
        except httpx.TransportError:
            return False
        return workflows.status_code == 200 and set(NAMES) <= {w["name"] for w in workflows.json()}

    deadline = time.monotonic() + STARTUP
    while not ready():
        for process in processes:
            assert process.poll() is None, f"{process.args!r} exited with {process.returncode}"
        assert time.monotonic() < deadline, "the service and the worker never became ready"
        time.sleep(0.1)  # still starting: poll until the worker has registered every workflow


def ledgerflow(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process, as a user runs it (the API's URL from the environment)."""
    return subprocess.run(
        [LEDGERFLOW, *args], env=stack.env, capture_output=True, text=True, timeout=60
    )


def scripted(stack: Stack, *args: str) -> tuple[int, Any]:
    """``ledgerflow -o json ...``: its exit status and the one JSON document it printed."""
    done = ledgerflow(stack, "-o", "json", *args)
    try:
        return done.returncode, json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"not one JSON document: {done.stdout!r} {done.stderr!r}") from None


def run_until(stack: Stack, run_id: str, holds: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The run once ``holds(run)``; fails after 30 s."""
    deadline = time.monotonic() + 30
    while True:
        response = stack.api.get(f"/runs/{run_id}")
        if response.status_code == 200 and holds(response.json()):
            return dict(response.json())
        assert time.monotonic() < deadline, f"run {run_id}: {response.text}"
        time.sleep(0.05)  # the scheduler and the worker move it: poll until it gets there


def flat(text: str) -> str:
    return " ".join(text.split())


def test_start_wait_prints_the_output_of_the_completed_run(stack: Stack) -> None:
    code, body = scripted(
        stack, "start", "cli_greet", "--input", '{"name": "ada"}', "--wait", "--timeout", "30"
    )
    assert code == 0, body
    assert body["status"] == "completed"
    assert body["output"] == {"greeting": "hello ada"}
    assert body["created"] is True and body["position"] > 0

    human = ledgerflow(stack, "start", "cli_greet", "--input", '{"name": "bob"}', "--wait")
    assert human.returncode == 0, human.stderr
    assert json.loads(human.stdout) == {"greeting": "hello bob"}
    assert "completed" in human.stderr


def test_a_failed_run_exits_1_and_runs_retry_resumes_it(stack: Stack, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    start = ["start", "cli_fragile", "--input", json.dumps({"marker": str(marker)}), "--wait"]
    code, body = scripted(stack, *start)
    assert code == 1
    assert (body["ok"], body["status"]) == (False, "failed")
    assert body["error"]["code"] == "run_failed"
    assert "marker is missing" in body["error"]["message"]
    run_id = body["run_id"]

    shown = ledgerflow(stack, "runs", "show", run_id)
    assert shown.returncode == 0
    assert "failed" in shown.stdout and "marker is missing" in flat(shown.stdout)

    marker.touch()
    code, body = scripted(stack, "runs", "retry", run_id)
    assert code == 0 and body["ok"] is True
    run = run_until(stack, run_id, lambda r: r["status"] == "completed")
    assert run["output"] == "repaired"

    code, history = scripted(stack, "runs", "history", run_id)
    assert code == 0
    kinds = [event["type"] for event in history["events"]]
    assert kinds[0] == "RunStarted"
    assert "RunFailed" in kinds and "RunRetried" in kinds and kinds[-1] == "RunCompleted"
    table = ledgerflow(stack, "runs", "history", run_id)
    assert table.returncode == 0 and "RunRetried" in table.stdout

    # Only a failed run retries: a refusal shows its code and message, and exits 1.
    refused = ledgerflow(stack, "runs", "retry", run_id)
    assert refused.returncode == 1
    assert "invalid_state" in refused.stderr and "only a failed run retries" in flat(refused.stderr)


def test_a_sent_event_wakes_the_run_waiting_for_it_and_triggers_a_workflow_once(
    stack: Stack,
) -> None:
    approval = f"a-{uuid.uuid4().hex[:8]}"
    code, started = scripted(
        stack, "start", "cli_approval", "--input", json.dumps({"id": approval})
    )
    assert code == 0
    run_id = started["run_id"]
    run_until(stack, run_id, lambda r: r["status"] == "waiting")

    data = json.dumps({"id": approval, "by": "grace"})
    code, sent = scripted(stack, "send", "cli.approved", "--data", data, "--id", approval)
    assert code == 0 and sent["created"] is True
    run = run_until(stack, run_id, lambda r: r["status"] == "completed")
    assert run["output"] == {"approved_by": "grace"}

    again = ledgerflow(stack, "send", "cli.approved", "--data", data, "--id", approval)
    assert again.returncode == 0
    assert "was sent before" in flat(again.stdout)

    key = f"event:{sent['event_id']}"  # a triggered run's key names its event

    def audited() -> bool:
        page = stack.api.get("/runs", params={"workflow": "cli_audit", "limit": 500}).json()
        return any(r["key"] == key and r["status"] == "completed" for r in page["items"])

    deadline = time.monotonic() + 30
    while not audited():
        assert time.monotonic() < deadline, "the event never triggered cli_audit"
        time.sleep(0.05)  # the scheduler routes the event: poll until the run is done
    code, page = scripted(stack, "runs", "list", "--workflow", "cli_audit", "--limit", "500")
    assert code == 0
    triggered = [r for r in page["items"] if r["key"] == key]
    assert len(triggered) == 1  # sent twice, triggered once
    code, run = scripted(stack, "runs", "show", triggered[0]["run_id"])
    assert code == 0
    assert run["output"] == f"approval {approval} recorded"


def test_runs_list_pages_and_runs_show_tells_a_run(stack: Stack) -> None:
    run_ids = []
    for name in ("x", "y"):  # started over HTTP: what is under test here is reading them
        body = {"workflow": "cli_greet", "input": {"name": name}, "key": name}
        run_ids.append(stack.api.post("/commands/start_run", json=body).json()["run_id"])
    code, started = scripted(stack, "start", "cli_greet", "--input", '{"name": "z"}', "--key", "z")
    assert code == 0
    run_ids.append(started["run_id"])
    position = started["position"]
    code, again = scripted(stack, "start", "cli_greet", "--input", '{"name": "z"}', "--key", "z")
    assert (code, again["run_id"], again["created"]) == (0, run_ids[-1], False)

    args = ["runs", "list", "--workflow", "cli_greet", "--limit", "2"]
    code, first = scripted(stack, *args, "--min-position", str(position))
    assert code == 0 and len(first["items"]) == 2 and first["next_cursor"]
    code, second = scripted(stack, *args, "--cursor", first["next_cursor"])
    assert code == 0
    listed = [r["run_id"] for r in first["items"] + second["items"]]
    assert set(run_ids) <= set(listed) and len(listed) == len(set(listed))

    table = ledgerflow(stack, *args)
    assert table.returncode == 0
    assert first["items"][0]["run_id"] in table.stdout and "--cursor" in table.stdout

    run_until(stack, run_ids[0], lambda r: r["status"] == "completed")
    code, run = scripted(stack, "runs", "show", run_ids[0])
    assert code == 0
    assert (run["workflow"], run["key"], run["status"]) == ("cli_greet", "x", "completed")
    assert [s["name"] for s in run["steps"]] == ["greet"]
    shown = ledgerflow(stack, "runs", "show", run_ids[0])
    assert shown.returncode == 0
    assert run_ids[0] in shown.stdout and "greet" in shown.stdout and "hello x" in shown.stdout


def test_a_waiting_run_is_cancelled_and_a_wait_for_it_times_out_first(stack: Stack) -> None:
    code, body = scripted(
        stack, "start", "cli_approval", "--input", '{"id": "never"}', "--wait", "--timeout", "1"
    )
    assert code == 5
    assert body["error"]["code"] == "timeout"
    run_id = body["run_id"]
    assert body["status"] in ("queued", "running", "waiting")

    run_until(stack, run_id, lambda r: r["status"] == "waiting")
    cancelled = ledgerflow(stack, "runs", "cancel", run_id, "--reason", "not needed")
    assert cancelled.returncode == 0, cancelled.stderr
    run = run_until(stack, run_id, lambda r: r["status"] == "cancelled")
    assert run["cancel_reason"] == "not needed"


def test_an_unknown_run_or_workflow_exits_4_with_a_clear_error(stack: Stack) -> None:
    unknown = str(uuid.uuid4())
    code, body = scripted(stack, "runs", "history", unknown)
    assert code == 4
    assert body["error"]["code"] == "run_not_found"
    assert unknown in body["error"]["message"]

    shown = ledgerflow(stack, "runs", "show", unknown)
    assert shown.returncode == 4
    assert f"error (run_not_found): run {unknown} not found" in flat(shown.stderr)
    code, body = scripted(stack, "runs", "cancel", unknown)
    assert code == 4 and body["error"]["code"] == "run_not_found"

    code, body = scripted(stack, "start", "no_such_workflow")
    assert code == 4 and body["error"]["code"] == "unknown_workflow"

    code, body = scripted(stack, "runs", "show", "not-a-run-id")
    assert code == 2 and body["error"]["code"] == "invalid_command"


def test_serve_without_nats_says_which_url_and_exits_3(stack: Stack) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    done = ledgerflow(stack, "--nats-url", url, "serve")
    assert done.returncode == 3
    assert f"cannot connect to NATS at {url}" in flat(done.stderr)
    assert "make up" in done.stderr
