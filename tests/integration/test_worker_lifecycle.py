"""A worker's limits and its life: step timeouts, and handing runs back on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest.mock import ANY

import pytest

from infrastructure.settings import Settings
from ledgerflow import UnknownWorkflowError
from services.clock import ManualClock
from tests.integration import worker_flows
from tests.integration.durable_stack import everything
from tests.integration.test_worker import engine
from tests.support import waiting
from tests.support.isolation import isolated
from tests.support.servers import stop_processes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DEADLINE = 15.0
ACK_WAIT = 30.0
"""The first worker's heartbeat timeout: a hand-back must not wait for it."""
PROMPT = 10.0
"""How soon after the stopped worker exits the second one must have completed the run."""
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(postgres_server_url: str) -> Iterator[Settings]:
    with isolated(postgres_server_url) as own:
        yield own


# ------------------------------------------------------------------------ step timeouts
def test_a_step_past_its_timeout_is_abandoned_recorded_and_retried(
    settings: Settings, tmp_path: Path
) -> None:
    log = tmp_path / "attempts"
    clock = ManualClock(datetime.now(tz=UTC))

    async def scenario() -> None:
        async with everything(settings, clock, worker_flows.flow) as stack:
            run_id = await stack.client.start("timely", {"log": str(log)})

            def retrying(run: dict[str, object]) -> bool:
                steps = run["steps"]
                assert isinstance(steps, dict)
                return bool((steps.get("fetch") or {}).get("status") == "retrying")

            await stack.until_run(run_id, retrying, "the timed-out step's retry")
            stack.clock.advance(timedelta(seconds=2))  # past the one-second backoff
            assert await stack.client.result(run_id, timeout=DEADLINE) == "fetched"
            run = await stack.client.get(run_id)
            assert run["steps"]["fetch"]["attempts"] == 2
            failures = [e for e in await stack.history(run_id) if type(e).__name__ == "StepFailed"]
            assert [(e.attempt, e.error) for e in failures] == [
                (
                    1,
                    {
                        "type": "StepTimeout",
                        "message": "step 'fetch' took longer than 0.5 s",
                        "traceback": ANY,
                    },
                )
            ]

    asyncio.run(scenario())
    assert log.read_text().splitlines() == ["attempt", "cancelled", "attempt"]


# ------------------------------------------------------------------ SIGTERM hand-back
def test_a_stopped_worker_finishes_its_step_and_hands_the_run_back_at_once(
    settings: Settings, tmp_path: Path
) -> None:
    log = tmp_path / "effects"
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    env = {
        **os.environ,
        **settings.as_env(),
    }

    def spawn(name: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "ledgerflow", "worker"]
        command += ["tests.integration.worker_flows:flow", "--ack-wait", f"{ACK_WAIT:g}"]
        with (tmp_path / f"{name}.log").open("wb") as out:
            return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out)

    def said(name: str, text: str) -> Callable[[], Awaitable[bool]]:
        async def holds() -> bool:
            file = tmp_path / f"{name}.log"
            return file.exists() and text in file.read_text()

        return holds

    def lines() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    def open_gate() -> None:
        # Non-blocking: fails (instead of hanging) unless the step is reading the FIFO.
        fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"go")
        finally:
            os.close(fd)

    async def scenario(workers: list[subprocess.Popen[bytes]]) -> None:
        async with engine(settings) as scheduler:
            first = spawn("first")
            workers.append(first)

            async def registered() -> bool:
                with contextlib.suppress(UnknownWorkflowError):
                    body = {"workflow": "handback", "key": "probe"}
                    await scheduler.client.command("start_run", body)
                    return True
                return False

            await waiting.until(registered, "the first worker to register", DEADLINE)
            run_id = await scheduler.start("handback", {"log": str(log), "gate": str(gate)})

            async def in_flight() -> bool:
                return any(line.startswith("start slow") for line in lines())

            await waiting.until(in_flight, "the slow step to start", DEADLINE)
            second = spawn("second")
            workers.append(second)
            await waiting.until(said("second", "serves"), "the second worker", DEADLINE)

            first.send_signal(signal.SIGTERM)
            await waiting.until(said("first", "stopping"), "the first worker to stop", DEADLINE)
            open_gate()  # only now may the step in flight finish

            async def exited() -> bool:
                return first.poll() is not None

            await waiting.until(exited, "the first worker to exit", DEADLINE)
            assert first.returncode == 0, (tmp_path / "first.log").read_text()
            gone = time.monotonic()
            run = await scheduler.when(
                run_id, lambda r: r["status"] == "completed", "the second worker to finish"
            )
            took = time.monotonic() - gone
            assert took < PROMPT, f"picked up after {took:.1f} s: it waited for ack_wait"
            assert run["output"] == [f"slow {first.pid}", f"after {second.pid}"]
            assert run["steps"]["slow"]["attempts"] == 1
            assert run["steps"]["after"]["attempts"] == 1

    workers: list[subprocess.Popen[bytes]] = []
    try:
        asyncio.run(scenario(workers))
    finally:
        stop_processes(workers)
    assert workers[-1].returncode == 0, (tmp_path / "second.log").read_text()
    first_pid, second_pid = workers[0].pid, workers[1].pid
    assert Counter(lines()) == {
        f"start slow {first_pid}": 1,
        f"done slow {first_pid}": 1,
        f"after {second_pid}": 1,
    }
    assert "handing back 1 run(s)" in (tmp_path / "first.log").read_text()


# -------------------------------------------------------------- heartbeats of sync steps
def test_a_sync_step_longer_than_the_ack_deadline_keeps_its_task_and_runs_once(
    settings: Settings, tmp_path: Path
) -> None:
    """Two workers with a 1 s ack deadline and a sync step of 2.5 s: were the step to
    block the event loop, its task would miss its heartbeats, be redelivered to the other
    worker, and the step would run twice."""
    log = tmp_path / "effects"
    env = {
        **os.environ,
        **settings.as_env(),
    }
    command = [sys.executable, "-m", "ledgerflow", "worker"]
    command += ["tests.integration.worker_flows:flow", "--ack-wait", "1"]
    workers = [
        subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(2)
    ]

    async def scenario() -> None:
        async with engine(settings) as scheduler:

            async def registered() -> bool:
                with contextlib.suppress(UnknownWorkflowError):
                    body = {"workflow": "long_sync", "key": "probe"}
                    await scheduler.client.command("start_run", body)
                    return True
                return False

            await waiting.until(registered, "the workers to register", DEADLINE)
            run_id = await scheduler.start("long_sync", {"log": str(log)})
            run = await scheduler.when(
                run_id, lambda r: r["status"] == "completed", "the long step to finish"
            )
            assert run["output"] == "done"

    try:
        asyncio.run(scenario())
    finally:
        stop_processes(workers)
    assert log.read_text().splitlines() == ["slow"]
