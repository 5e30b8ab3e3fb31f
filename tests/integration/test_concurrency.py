"""Concurrency limits end to end: commands, relay, the real scheduler and a worker."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from infrastructure.settings import Settings
from ledgerflow import Concurrency, Flow, RunContext
from services.clock import ManualClock
from tests.integration.durable_stack import DEADLINE, Stack, everything, kinds
from tests.support import waiting
from tests.support.isolation import isolated

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

flow = Flow("concurrency")
GATES: dict[str, asyncio.Event] = {}  # one per run (by its input's "n"): the test opens it
RUNNING: Counter[str] = Counter()  # steps in progress now, per group
PEAK: Counter[str] = Counter()  # the most steps ever in progress at once, per group
DONE: Counter[str] = Counter()


async def hold(group: str, n: str) -> str:
    """A step that counts itself in progress until the test opens its gate."""
    RUNNING[group] += 1
    PEAK[group] = max(PEAK[group], RUNNING[group])
    try:
        await GATES.setdefault(n, asyncio.Event()).wait()
    finally:
        RUNNING[group] -= 1
    DONE[n] += 1
    return f"{n}-done"


@flow.workflow(concurrency=2)
async def capped(ctx: RunContext, data: dict[str, Any]) -> str:
    return await ctx.step("hold", hold, "all", str(data["n"]))


@flow.workflow(concurrency=Concurrency(limit=1, key="customer"))
async def per_customer(ctx: RunContext, data: dict[str, Any]) -> str:
    return await ctx.step("hold", hold, str(data.get("customer")), str(data["n"]))


@pytest.fixture
def settings(postgres_server_url: str) -> Iterator[Settings]:
    with isolated(postgres_server_url) as own:
        yield own


def on_stack(settings: Settings, scenario: Callable[[Stack], Awaitable[None]]) -> None:
    GATES.clear()
    RUNNING.clear()
    PEAK.clear()
    DONE.clear()

    async def main() -> None:
        async with everything(settings, ManualClock(datetime.now(tz=UTC)), flow) as stack:
            await scenario(stack)

    asyncio.run(main())


async def statuses(stack: Stack, run_ids: list[str]) -> list[str]:
    return [str((await stack.client.get(run_id))["status"]) for run_id in run_ids]


async def until_statuses(stack: Stack, run_ids: list[str], expected: list[str]) -> None:
    async def reached() -> bool:
        return await statuses(stack, run_ids) == expected

    await waiting.until(reached, f"statuses {expected}", DEADLINE)


def open_gate(n: str) -> None:
    GATES.setdefault(n, asyncio.Event()).set()


def test_at_most_two_runs_at_once_and_the_oldest_held_back_run_goes_next(
    settings: Settings,
) -> None:
    async def scenario(stack: Stack) -> None:
        client = stack.client
        ids = [await client.start(capped, {"n": str(n)}) for n in range(5)]
        running, queued = ["running"] * 2, ["queued"] * 3
        await until_statuses(stack, ids, running + queued)
        assert RUNNING["all"] == 2

        # The end of run 0 lets the oldest held-back run (2) in, and only it.
        open_gate("0")
        assert await client.result(ids[0], timeout=DEADLINE) == "0-done"
        await until_statuses(stack, ids, ["completed", "running", "running", "queued", "queued"])

        for n in range(1, 5):
            open_gate(str(n))
        outputs = [await client.result(run_id, timeout=DEADLINE) for run_id in ids]
        assert outputs == [f"{n}-done" for n in range(5)]
        assert PEAK["all"] == 2 and RUNNING["all"] == 0
        assert dict(DONE) == {str(n): 1 for n in range(5)}
        history = kinds(await stack.history(ids[4]), dispatches=True)
        assert history == [
            "RunStarted",
            "TaskDispatched",
            "StepStarted",
            "StepCompleted",
            "RunCompleted",
        ]
        reasons = [
            [e.reason for e in await stack.history(run_id) if type(e).__name__ == "TaskDispatched"]
            for run_id in ids
        ]
        assert reasons == [["start"], ["start"], ["released"], ["released"], ["released"]]

    on_stack(settings, scenario)


def test_each_key_has_its_own_limit(settings: Settings) -> None:
    async def scenario(stack: Stack) -> None:
        client = stack.client
        inputs = [
            {"customer": "a", "n": "a1"},
            {"customer": "a", "n": "a2"},
            {"customer": "b", "n": "b1"},
            {"n": "x1"},  # no key field: the null group
            {"n": "x2"},
        ]
        ids = [await client.start(per_customer, data) for data in inputs]
        await until_statuses(stack, ids, ["running", "queued", "running", "running", "queued"])

        open_gate("b1")  # b's end frees b's slot only
        assert await client.result(ids[2], timeout=DEADLINE) == "b1-done"
        open_gate("x1")
        assert await client.result(ids[3], timeout=DEADLINE) == "x1-done"
        await until_statuses(stack, ids, ["running", "queued", "completed", "completed", "running"])

        for n in ("a1", "a2", "x2"):
            open_gate(n)
        outputs = [await client.result(run_id, timeout=DEADLINE) for run_id in ids]
        assert outputs == [f"{data['n']}-done" for data in inputs]
        assert PEAK == {"a": 1, "b": 1, "None": 1}

    on_stack(settings, scenario)
