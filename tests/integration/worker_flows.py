"""Workflows the worker tests run, in process and in a separate worker process."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ledgerflow import Flow, NonRetryableError, RetryPolicy, RunContext

flow = Flow("worker-tests")

CRASH_STEPS = 8
STEP_SECONDS = 0.4
"""How long each crash-test step works: long enough to kill the worker mid-run."""


def _append(path: str, line: str) -> None:
    with Path(path).open("a") as f:
        f.write(line + "\n")


def _lines(path: str) -> list[str]:
    file = Path(path)
    return file.read_text().splitlines() if file.exists() else []


def double(n: int) -> int:
    return n * 2


async def add_one(n: int) -> int:
    return n + 1


@flow.workflow(name="three-steps")
async def three_steps(ctx: RunContext, input: dict[str, int]) -> list[int]:
    a = await ctx.step("double", double, input["n"])
    b = await ctx.step("add", add_one, a)
    c = await ctx.step("square", lambda x: x * x, b)
    return [a, b, c]


@flow.workflow(name="flaky", retry=RetryPolicy(max_attempts=3, initial_interval=0.0))
async def flaky(ctx: RunContext, input: dict[str, str]) -> str:
    def call() -> str:
        _append(input["log"], "attempt")
        if len(_lines(input["log"])) < 3:
            raise ConnectionError("the service is down")
        return "ok"

    return await ctx.step("call", call)


@flow.workflow(name="hopeless", retry=RetryPolicy(max_attempts=5, initial_interval=0.0))
async def hopeless(ctx: RunContext, input: dict[str, str]) -> str:
    def call() -> str:
        _append(input["log"], "attempt")
        raise NonRetryableError("card declined")

    return await ctx.step("call", call)


@flow.workflow(name="send")
async def send(ctx: RunContext, input: dict[str, Any]) -> str:
    return await ctx.send_event("notify", "thing.happened", {"what": input["what"]})


@flow.workflow(name="crash")
async def crash(ctx: RunContext, input: dict[str, str]) -> int:
    async def work(i: int) -> int:
        _append(input["log"], f"start {i}")
        await asyncio.sleep(STEP_SECONDS)  # the step's work
        _append(input["log"], f"done {i}")
        return i

    total = 0
    for i in range(CRASH_STEPS):
        total += await ctx.step(f"step-{i}", work, i)
    return total
