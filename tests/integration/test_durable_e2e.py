"""A workflow journey through every moving part: real scheduler, relay, commands and worker."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from domain.errors import RunNotFoundError
from domain.ids import run_id_for
from infrastructure.settings import Settings
from ledgerflow import Client, Flow, RetryPolicy, RunContext
from services.clock import ManualClock
from tests.integration.durable_stack import DEADLINE, everything
from tests.support import waiting

pytestmark = pytest.mark.integration

flow = Flow("journeys")
CALLS: Counter[str] = Counter()


def flaky_charge(order: str) -> str:
    CALLS["charge"] += 1
    if CALLS["charge"] == 1:
        raise ConnectionError("the gateway hung up")  # retried by the policy
    return f"ch-{order}"


@flow.workflow(retry=RetryPolicy(max_attempts=3, initial_interval=1, max_interval=1))
async def journey(ctx: RunContext, order: dict[str, Any]) -> dict[str, Any]:
    charge = await ctx.step("charge", flaky_charge, order["id"])
    await ctx.sleep("cool-off", timedelta(minutes=10))
    shipped = await ctx.wait_for_event(
        "shipped", "shipment.confirmed", match={"order": order["id"]}, timeout=timedelta(days=1)
    )
    invoice = await ctx.invoke("invoice", "invoice", {"order": order["id"]})
    await ctx.send_event("announce", "order.fulfilled", {"order": order["id"]})
    return {"charge": charge, "carrier": (shipped or {}).get("carrier"), "invoice": invoice}


@flow.workflow()
async def invoice(ctx: RunContext, data: dict[str, Any]) -> str:
    return await ctx.step("issue", lambda: f"inv-{data['order']}")


@flow.workflow(triggers=["order.fulfilled"])
async def thank_you(ctx: RunContext, event: dict[str, Any]) -> str:
    CALLS["thank_you"] += 1
    return await ctx.step("mail", lambda: f"thanks for {event['order']}")


def exists(client: Client, run_id: str) -> Callable[[], Awaitable[bool]]:
    """The scheduler starts a triggered run after the event: it may not exist yet."""

    async def check() -> bool:
        try:
            await client.get(run_id)
        except RunNotFoundError:
            return False
        return True

    return check


@pytest.fixture
def settings(backend_settings: Settings) -> Settings:
    """Every scenario here runs on the embedded engine and on PostgreSQL + NATS."""
    return backend_settings


def test_a_run_retries_sleeps_waits_invokes_and_triggers_through_the_real_scheduler(
    settings: Settings,
) -> None:
    CALLS.clear()
    clock = ManualClock(datetime.now(tz=UTC))

    async def scenario() -> None:
        async with everything(settings, clock, flow) as stack:
            client = stack.client
            run_id = str(await client.start("journey", {"id": "o-1"}))

            def charge_retrying(run: dict[str, Any]) -> bool:
                return bool(run["steps"].get("charge", {}).get("status") == "retrying")

            await stack.until_run(run_id, charge_retrying, "the charge's retry")
            clock.advance(timedelta(seconds=2))  # the retry becomes due
            await stack.until_run(run_id, lambda r: r["status"] == "sleeping", "the sleep")
            clock.advance(timedelta(minutes=11))  # the cool-off is over
            await stack.until_run(run_id, lambda r: "shipped" in r["waits"], "the wait")
            await client.send_event("shipment.confirmed", {"order": "o-2", "carrier": "dhl"})
            await client.send_event("shipment.confirmed", {"order": "o-1", "carrier": "ups"})
            output = await client.result(run_id, timeout=DEADLINE)
            assert output == {"charge": "ch-o-1", "carrier": "ups", "invoice": "inv-o-1"}

            run = await client.get(run_id)
            announced = run["sent_events"]["announce"]
            thanks = str(run_id_for("thank_you", f"event:{announced}"))
            await waiting.until(exists(client, thanks), "the triggered run", DEADLINE)
            assert await client.result(thanks, timeout=DEADLINE) == "thanks for o-1"

    asyncio.run(scenario())
    assert CALLS == {"charge": 2, "thank_you": 1}
