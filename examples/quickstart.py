"""The quickstart: a greeting that takes three steps, retries one, and naps durably.

    make dev        # runs it in `ledgerflow dev` and shows it in the UI

A newcomer's first run shows what ledgerflow does in under ten seconds: named steps whose
results are recorded, an attempt that fails and is retried with backoff, and a sleep that
survives a restart (stop `ledgerflow dev` during the nap and start it again).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from ledgerflow import Flow, RetryPolicy, RunContext

flow = Flow("quickstart")

_FLAKY: dict[str, int] = {}


def look_up(name: str) -> dict[str, str]:
    return {"name": name, "language": "en"}


def translate(profile: dict[str, str]) -> str:
    """Fails on its first attempt for each name, to show a retry in the timeline."""
    attempts = _FLAKY[profile["name"]] = _FLAKY.get(profile["name"], 0) + 1
    if attempts == 1:
        raise ConnectionError("the translation service timed out")
    return f"Hello, {profile['name']}!"


def deliver(greeting: str) -> dict[str, Any]:
    return {"delivered": greeting, "channel": "console"}


@flow.workflow(retry=RetryPolicy(max_attempts=3, initial_interval=0.5, max_interval=2))
async def greet(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    profile = await ctx.step("look up", look_up, data.get("name", "world"))
    greeting = await ctx.step("translate", translate, profile)
    await ctx.sleep("pause", timedelta(seconds=2))
    return await ctx.step("deliver", deliver, greeting)
