"""Workflows the worker tests run, in process and in a separate worker process."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta
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


STEP_TIMEOUT = timedelta(seconds=0.5)


@flow.workflow(
    name="timely",
    step_timeout=STEP_TIMEOUT,
    retry=RetryPolicy(max_attempts=3, initial_interval=1, max_interval=1),
)
async def timely(ctx: RunContext, input: dict[str, str]) -> str:
    async def fetch() -> str:
        _append(input["log"], "attempt")
        if len(_lines(input["log"])) == 1:  # the first attempt hangs past the step timeout
            try:
                await asyncio.sleep(60)  # the step's (too slow) work
            except asyncio.CancelledError:
                _append(input["log"], "cancelled")
                raise
        return "fetched"

    return await ctx.step("fetch", fetch)


@flow.workflow(name="handback")
async def handback(ctx: RunContext, input: dict[str, str]) -> list[str]:
    """A step that works until the test opens its gate (a FIFO), then one more step."""

    async def slow() -> str:
        _append(input["log"], f"start slow {os.getpid()}")
        await asyncio.to_thread(Path(input["gate"]).read_text)  # blocks until the gate opens
        _append(input["log"], f"done slow {os.getpid()}")
        return f"slow {os.getpid()}"

    def after() -> str:
        _append(input["log"], f"after {os.getpid()}")
        return f"after {os.getpid()}"

    return [await ctx.step("slow", slow), await ctx.step("after", after)]


@flow.workflow(name="long_sync")
async def long_sync(ctx: RunContext, input: dict[str, str]) -> str:
    """One sync step that works longer than the workers' ack deadline."""

    def slow() -> str:
        _append(input["log"], "slow")
        time.sleep(2.5)  # the step's own work
        return "done"

    return await ctx.step("slow", slow)
