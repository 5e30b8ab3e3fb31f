"""Workflows the crash tests run in separate worker processes.

Every side effect is one ``os.write`` to a file opened with ``O_APPEND``, so the lines of
concurrent writers (several tasks, or two worker processes) never interleave.
"""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from typing import Any

from ledgerflow import Flow, NonRetryableError, RetryPolicy, RunContext

flow = Flow("crash-tests")

NAP_SECONDS = 1.0
"""The first durable sleep; each run adds ``stagger`` so timers fall due one after another."""
DOZE_SECONDS = 1.0
UNDO_SECONDS = 0.6
"""How long each compensation works: long enough to kill the worker in the middle of one."""
UNDO_STEPS = 3


def append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@flow.workflow(name="napper")
async def napper(ctx: RunContext, input: dict[str, Any]) -> str:
    """Three steps around two durable sleeps."""
    log, tag = str(input["log"]), str(input["tag"])

    def effect(step: str) -> str:
        append(log, f"{tag} {step}")
        return step

    a = await ctx.step("a", effect, "a")
    await ctx.sleep("nap", timedelta(seconds=NAP_SECONDS + float(input["stagger"])))
    b = await ctx.step("b", effect, "b")
    await ctx.sleep("doze", timedelta(seconds=DOZE_SECONDS))
    c = await ctx.step("c", effect, "c")
    return a + b + c


@flow.workflow(name="undo", retry=RetryPolicy(max_attempts=1))
async def undo(ctx: RunContext, input: dict[str, str]) -> None:
    """``UNDO_STEPS`` compensable steps, then one that fails for good."""
    log, effects = input["log"], input["effects"]

    def do(i: int) -> int:
        append(log, f"do {i}")
        return i

    async def compensate(i: int) -> None:
        append(log, f"undo-start {i}")
        await asyncio.sleep(UNDO_SECONDS)  # the compensation's work
        # Idempotent in effect, as a compensation must be (they run at least once):
        # the marker file exists once, whoever creates it records the effect.
        try:
            fd = os.open(f"{effects}.{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            append(log, f"undo-again {i}")
        else:
            os.close(fd)
            append(effects, f"undone {i}")
        append(log, f"undo-end {i}")

    for i in range(UNDO_STEPS):
        await ctx.step(f"do-{i}", do, i, compensate=compensate)

    def boom() -> None:
        raise NonRetryableError("the last step fails for good")

    await ctx.step("boom", boom)
