"""Workflows the CLI's integration tests drive through `ledgerflow worker`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ledgerflow import Flow, NonRetryableError, RunContext

flow = Flow("cli-tests")


@flow.workflow(name="cli_greet")
async def greet(ctx: RunContext, input: dict[str, str]) -> dict[str, str]:
    return await ctx.step("greet", lambda: {"greeting": f"hello {input['name']}"})


@flow.workflow(name="cli_fragile")
async def fragile(ctx: RunContext, input: dict[str, str]) -> str:
    """Fails for good until the file ``input["marker"]`` exists; an operator retry then works."""

    def check() -> str:
        if not Path(input["marker"]).exists():
            raise NonRetryableError(f"{Path(input['marker']).name} is missing")
        return "repaired"

    return await ctx.step("check", check)


@flow.workflow(name="cli_approval")
async def approval(ctx: RunContext, input: dict[str, str]) -> dict[str, Any]:
    data = await ctx.wait_for_event("approval", "cli.approved", match={"id": input["id"]})
    assert data is not None  # no timeout: only a matching event ends the wait
    return {"approved_by": data["by"]}


@flow.workflow(name="cli_audit", triggers=["cli.approved"])
async def audit(ctx: RunContext, event: dict[str, Any]) -> str:
    return await ctx.step("record", lambda: f"approval {event['id']} recorded")


NAMES = ("cli_greet", "cli_fragile", "cli_approval", "cli_audit")
