"""``ledgerflow dev`` as a newcomer runs it (``make dev``): one process, no servers, a
finished example run in the API and the UI, and nothing lost across a restart."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.servers import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LEDGERFLOW = str(Path(sys.executable).with_name("ledgerflow"))
DEADLINE = 30.0


class Dev:
    """A running ``ledgerflow dev`` and what it printed."""

    def __init__(self, process: subprocess.Popen[str], api_url: str) -> None:
        self.process = process
        self.api_url = api_url
        self.lines: list[str] = []

    def read_until(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + DEADLINE
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"dev exited ({self.process.poll()}): {self.lines}")
            self.lines.append(line.rstrip("\n"))
            found = re.search(pattern, line)
            if found:
                return found
        raise AssertionError(f"no line matched {pattern!r}: {self.lines}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [LEDGERFLOW, "--api-url", self.api_url, *args],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            cwd=ROOT,
        )

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(DEADLINE)


@pytest.fixture
def start_dev(tmp_path: Path) -> Iterator[Any]:
    running: list[Dev] = []
    port = free_port()

    def start(*args: str) -> Dev:
        process = subprocess.Popen(
            [LEDGERFLOW, "dev", *args, "--port", str(port), "--db", str(tmp_path / "dev.db")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
        )
        dev = Dev(process, f"http://127.0.0.1:{port}")
        running.append(dev)
        dev.read_until(r"ledgerflow dev is up")
        return dev

    yield start
    for dev in running:
        if dev.process.poll() is None:
            dev.process.kill()
            dev.process.wait()
        if dev.process.stdout is not None:
            dev.process.stdout.close()


def until_completed(dev: Dev, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        run: dict[str, Any] = httpx.get(f"{dev.api_url}/runs/{run_id}").json()
        if run.get("status") == "completed":
            return run
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} did not complete: {run}")


def test_make_devs_first_run_finishes_and_shows_in_the_ui_and_survives_a_restart(
    start_dev: Any,
) -> None:
    dev = start_dev("examples.quickstart", "--start", 'greet={"name": "newcomer"}')
    run_id = dev.read_until(r"started greet: \S+/ui/runs/(\S+)").group(1)
    assert f"  UI    {dev.api_url}/ui/" in dev.lines  # it says where the UI is
    run = until_completed(dev, run_id)
    assert run["output"] == {"delivered": "Hello, newcomer!", "channel": "console"}
    translate = next(s for s in run["steps"] if s["name"] == "translate")
    assert translate["attempts"] == 2  # the retry the quickstart shows off

    page = httpx.get(f"{dev.api_url}/ui/runs/{run_id}")
    assert page.status_code == 200 and "completed" in page.text and "translate" in page.text

    listed = dev.cli("-o", "json", "runs", "list")
    assert listed.returncode == 0, listed.stderr
    assert [r["run_id"] for r in json.loads(listed.stdout)["items"]] == [run_id]
    started = dev.cli("-o", "json", "start", "greet", "--input", '{"name": "cli"}', "--wait")
    assert started.returncode == 0, started.stderr
    status = dev.cli("-o", "json", "projections", "status", "--api")
    assert status.returncode == 0, status.stderr
    assert {p["name"]: p["lag"] for p in json.loads(status.stdout)}["runs"] == 0
    rebuilt = dev.cli("-o", "json", "projections", "rebuild", "--all", "--api")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert [r["name"] for r in json.loads(rebuilt.stdout)["rebuilt"]] == [
        "runs",
        "workflows",
        "inbound_events",
    ]
    assert dev.stop() == 0

    again = start_dev("examples.quickstart")
    listed = again.cli("-o", "json", "runs", "list")
    assert len(json.loads(listed.stdout)["items"]) == 2  # the store kept both
    assert again.stop() == 0


def test_a_flow_that_cannot_be_loaded_is_a_usage_error() -> None:
    done = subprocess.run(
        [LEDGERFLOW, "dev", "examples.nope:flow", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert "cannot load examples.nope:flow" in done.stderr
