"""The worker on real PostgreSQL and nats-server, with the scheduler emulated by the test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from examples import fanout, orders
from infrastructure.settings import Settings
from ledgerflow import Client, Flow, RunFailedError, UnknownWorkflowError
from tests.integration import worker_flows
from tests.integration.durable_stack import stack
from tests.support import waiting
from tests.support.isolation import isolated
from tests.support.servers import stop_processes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DEADLINE = 15.0
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(postgres_server_url: str) -> Any:
    with isolated(postgres_server_url) as own:
        yield own


class Scheduler:
    """Does by hand what the scheduler will do: dispatch, fire timers, deliver events."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def start(self, workflow: str, input: Any) -> str:
        reply = await self.client.command("start_run", {"workflow": workflow, "input": input})
        run_id = str(reply["run_id"])
        await self.dispatch(run_id, "started", reply["position"])
        return run_id

    async def dispatch(self, run_id: str, reason: str, cause: int | None = None) -> None:
        if cause is None:  # the store's head is past every event that made the run movable
            cause = (await self.client.command("load_run", {"run_id": run_id}))["position"]
        body = {"run_id": run_id, "reason": reason, "cause": cause}
        await self.client.command("dispatch_run", body)

    async def when(
        self, run_id: str, condition: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        async def holds() -> bool:
            seen.update(await self.client.get(run_id))
            return condition(seen)

        await waiting.until(holds, what, DEADLINE)
        return seen

    async def ended(self, run_id: str) -> dict[str, Any]:
        return await self.when(
            run_id, lambda r: r["status"] in ("completed", "failed", "cancelled"), "the run's end"
        )

    async def retry_when_due(self, run_id: str, step: str, attempts: int) -> None:
        def retrying(run: dict[str, Any]) -> bool:
            state = run["steps"].get(step) or {}
            return state.get("status") == "retrying" and state.get("attempts") == attempts

        await self.when(run_id, retrying, f"step {step} retrying after attempt {attempts}")
        await self.dispatch(run_id, "retry")

    async def deliver(self, run_id: str, wait: str, event: str, data: dict[str, Any]) -> None:
        await self.when(run_id, lambda r: wait in r["waits"], f"wait {wait}")
        reply = await self.client.command("send_event", {"name": event, "data": data})
        body = {"run_id": run_id, "name": wait, "event_id": reply["event_id"]}
        delivered = await self.client.command("deliver_event", body)
        await self.dispatch(run_id, "event", delivered["position"])


@asynccontextmanager
async def engine(settings: Settings, flow: Flow | None = None) -> AsyncIterator[Scheduler]:
    """Command service, relay and (given a flow) a worker, all in this process; the test
    plays the scheduler's part (``Scheduler``)."""
    async with stack(settings, flow, scheduler=False) as running:
        yield Scheduler(running.client)


# ------------------------------------------------------------------------------ tests
def test_a_three_step_workflow_completes_with_its_outputs(settings: Settings) -> None:
    async def scenario() -> None:
        async with engine(settings, worker_flows.flow) as scheduler:
            run_id = await scheduler.start("three-steps", {"n": 3})
            assert await scheduler.client.result(run_id, DEADLINE) == [6, 7, 49]
            run = await scheduler.client.get(run_id)
            assert {n: s["output"] for n, s in run["steps"].items()} == {
                "double": 6,
                "add": 7,
                "square": 49,
            }
            assert all(s["attempts"] == 1 for s in run["steps"].values())

    asyncio.run(scenario())


def test_a_step_that_fails_twice_is_retried_until_it_succeeds(
    settings: Settings, tmp_path: Path
) -> None:
    log = tmp_path / "attempts"

    async def scenario() -> None:
        async with engine(settings, worker_flows.flow) as scheduler:
            run_id = await scheduler.start("flaky", {"log": str(log)})
            await scheduler.retry_when_due(run_id, "call", 1)
            await scheduler.retry_when_due(run_id, "call", 2)
            assert await scheduler.client.result(run_id, DEADLINE) == "ok"
            run = await scheduler.client.get(run_id)
            assert run["steps"]["call"]["attempts"] == 3

    asyncio.run(scenario())
    assert log.read_text().splitlines() == ["attempt"] * 3


def test_a_non_retryable_error_fails_the_run_at_once(settings: Settings, tmp_path: Path) -> None:
    log = tmp_path / "attempts"

    async def scenario() -> None:
        async with engine(settings, worker_flows.flow) as scheduler:
            run_id = await scheduler.start("hopeless", {"log": str(log)})
            with pytest.raises(RunFailedError) as failed:
                await scheduler.client.result(run_id, DEADLINE)
            assert failed.value.status == "failed"
            assert failed.value.error["type"] == "StepFailedError"
            assert "card declined" in failed.value.error["message"]
            run = await scheduler.client.get(run_id)
            assert run["steps"]["call"]["status"] == "failed"
            assert run["steps"]["call"]["error"]["type"] == "NonRetryableError"

    asyncio.run(scenario())
    assert log.read_text().splitlines() == ["attempt"]


def test_an_order_is_fulfilled_once_its_confirmation_event_arrives(settings: Settings) -> None:
    orders.EFFECTS.clear()
    order = {"order_id": "o-1", "amount_cents": 1250, "items": ["book", "pen"]}

    async def scenario() -> None:
        async with engine(settings, orders.flow) as scheduler:
            run_id = await scheduler.start("fulfil_order", order)
            await scheduler.deliver(
                run_id, "confirmation", "order.confirmed", {"order_id": "o-1", "by": "ann"}
            )
            receipt = await scheduler.client.result(run_id, DEADLINE)
            assert receipt == {
                "order_id": "o-1",
                "charge_id": "ch-o-1",
                "tracking": "track-o-1",
                "confirmed_by": "ann",
            }
            run = await scheduler.client.get(run_id)
            assert list(run["sent_events"]) == ["announce"]

    asyncio.run(scenario())
    assert orders.EFFECTS == ["charge o-1 1250", "reserve book,pen", "ship o-1"]


def test_a_failed_order_is_compensated_in_reverse_order(settings: Settings) -> None:
    orders.EFFECTS.clear()
    order = {"order_id": "o-2", "amount_cents": 990, "items": ["lamp"], "address": "nowhere"}

    async def scenario() -> None:
        async with engine(settings, orders.flow) as scheduler:
            run_id = await scheduler.start("fulfil_order", order)
            await scheduler.when(run_id, lambda r: r["status"] == "compensating", "compensation")
            await scheduler.dispatch(run_id, "compensate")  # as on CompensationStarted
            with pytest.raises(RunFailedError):
                await scheduler.client.result(run_id, DEADLINE)
            run = await scheduler.client.get(run_id)
            assert run["status"] == "failed"
            assert run["steps"]["charge"]["status"] == "compensated"
            assert run["steps"]["reserve"]["status"] == "compensated"

    asyncio.run(scenario())
    assert orders.EFFECTS == [
        "charge o-2 990",
        "reserve lamp",
        "release res-lamp",
        "refund ch-o-2 990",
    ]


def test_a_cancelled_run_is_compensated(settings: Settings) -> None:
    orders.EFFECTS.clear()
    order = {"order_id": "o-3", "amount_cents": 500, "items": ["cup"]}

    async def scenario() -> None:
        async with engine(settings, orders.flow) as scheduler:
            run_id = await scheduler.start("fulfil_order", order)
            await scheduler.when(run_id, lambda r: "confirmation" in r["waits"], "the wait")
            await scheduler.client.cancel(run_id, "changed my mind")
            await scheduler.dispatch(run_id, "compensate")
            run = await scheduler.ended(run_id)
            assert run["status"] == "cancelled"

    asyncio.run(scenario())
    assert orders.EFFECTS[3:] == ["recall track-o-3", "release res-cup", "refund ch-o-3 500"]


def test_a_run_sends_an_event_once(settings: Settings) -> None:
    async def scenario() -> None:
        async with engine(settings, worker_flows.flow) as scheduler:
            run_id = await scheduler.start("send", {"what": "x"})
            event_id = await scheduler.client.result(run_id, DEADLINE)
            run = await scheduler.client.get(run_id)
            assert run["sent_events"] == {"notify": event_id}

    asyncio.run(scenario())


def test_parallel_steps_fan_out_and_fan_in(settings: Settings) -> None:
    async def scenario() -> None:
        async with engine(settings, fanout.flow) as scheduler:
            items = ["apple", "pear", "plum", "fig"]
            run_id = await scheduler.start("price_basket", items)
            assert await scheduler.client.result(run_id, DEADLINE) == {"items": 4, "total": 175}
            run = await scheduler.client.get(run_id)
            assert len(run["steps"]) == 5

    asyncio.run(scenario())


def test_the_client_raises_typed_errors(settings: Settings) -> None:
    async def scenario() -> None:
        async with engine(settings) as scheduler:
            with pytest.raises(UnknownWorkflowError) as unknown:
                await scheduler.client.start("nope", {})
            assert unknown.value.code == "unknown_workflow"

    asyncio.run(scenario())


# ---------------------------------------------------------------------- crash recovery
def test_a_run_survives_its_worker_being_killed(settings: Settings, tmp_path: Path) -> None:
    log = tmp_path / "effects"
    env = {
        **os.environ,
        **settings.as_env(),
    }

    def spawn(name: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "ledgerflow", "worker"]
        command += ["tests.integration.worker_flows:flow", "--ack-wait", "2", "--concurrency", "2"]
        with (tmp_path / f"{name}.log").open("wb") as out:
            return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out)

    def lines() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    async def scenario(workers: list[subprocess.Popen[bytes]]) -> None:
        async with engine(settings) as scheduler:
            workers.append(spawn("first"))

            async def registered() -> bool:
                with contextlib.suppress(UnknownWorkflowError):
                    await scheduler.client.command("start_run", {"workflow": "crash", "key": "x"})
                    return True
                return False

            await waiting.until(registered, "the worker to register", DEADLINE)
            run_id = await scheduler.start("crash", {"log": str(log)})

            async def midway() -> bool:
                return "done 2" in lines()

            await waiting.until(midway, "three steps done", DEADLINE)
            workers[0].send_signal(signal.SIGKILL)
            workers[0].wait(5)
            workers.append(spawn("second"))
            run = await scheduler.when(
                run_id, lambda r: r["status"] == "completed", "the run to complete"
            )
            assert run["output"] == sum(range(worker_flows.CRASH_STEPS))

    workers: list[subprocess.Popen[bytes]] = []
    try:
        asyncio.run(scenario(workers))
    finally:
        stop_processes(workers)
    assert workers[-1].returncode == 0, (tmp_path / "second.log").read_text()
    starts = Counter(line for line in lines() if line.startswith("start"))
    assert set(starts) == {f"start {i}" for i in range(worker_flows.CRASH_STEPS)}
    twice = [line for line, n in starts.items() if n > 1]
    assert len(twice) <= 1 and max(starts.values()) <= 2, starts
