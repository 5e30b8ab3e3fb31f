"""The workflows the benchmarks run: three or twenty steps, each returning a small dict."""

from __future__ import annotations

from typing import Any

from ledgerflow import Flow, RunContext

flow = Flow("bench")


def work(n: int) -> dict[str, int]:
    return {"n": n}


@flow.workflow()
async def three_steps(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    a = await ctx.step("one", work, 1)
    b = await ctx.step("two", work, 2)
    c = await ctx.step("three", work, 3)
    return {"sum": a["n"] + b["n"] + c["n"], "input": data}


@flow.workflow()
async def twenty_steps(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    total = 0
    for n in range(20):
        total += (await ctx.step(f"s{n}", work, n))["n"]
    return {"sum": total, "input": data}
