"""The HTTP API tells the same story on both backends: the embedded engine of
``ledgerflow dev`` and PostgreSQL + NATS (``ledgerflow serve``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from infrastructure.settings import Settings
from ledgerflow import Flow, NonRetryableError, RunContext
from services.clock import ManualClock
from tests.integration.durable_stack import DEADLINE, with_api
from tests.support import waiting

pytestmark = pytest.mark.integration

flow = Flow("backends")


@flow.workflow()
async def greet(ctx: RunContext, data: dict[str, Any]) -> dict[str, Any]:
    hello = await ctx.step("hello", lambda: f"hello {data['name']}")
    loud = await ctx.step("shout", lambda: hello.upper())
    return {"greeting": loud}


def refuse() -> None:
    raise NonRetryableError("card declined")


@flow.workflow()
async def fragile(ctx: RunContext, data: Any) -> None:
    await ctx.step("charge", refuse)


@flow.workflow()
async def patient(ctx: RunContext, data: Any) -> Any:
    return await ctx.wait_for_event("go", "go.ahead")


@flow.workflow(triggers=["order.placed"])
async def on_order(ctx: RunContext, event: dict[str, Any]) -> str:
    return await ctx.step("ack", lambda: f"got {event['order']}")


ENDED = {"completed", "failed", "cancelled"}
UNKNOWN = "00000000-0000-0000-0000-000000000001"


def on_api(settings: Settings, scenario: Callable[[httpx.AsyncClient], Awaitable[None]]) -> None:
    async def main() -> None:
        clock = ManualClock(datetime.now(tz=UTC))
        async with (
            with_api(settings, clock, flow) as running,
            httpx.AsyncClient(base_url=running.api_url, timeout=5.0) as http,
        ):
            await scenario(http)

    asyncio.run(main())


async def command(http: httpx.AsyncClient, name: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await http.post(f"/commands/{name}", json=body)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


async def run_where(
    http: httpx.AsyncClient, run_id: str, test: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def holds() -> bool:
        response = await http.get(f"/runs/{run_id}")
        if response.status_code == 404:
            return False
        seen.clear()
        seen.update(response.json())
        return test(seen)

    await waiting.until(holds, what, DEADLINE)
    return seen


async def ended(http: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    return await run_where(http, run_id, lambda r: r["status"] in ENDED, "the run's end")


def test_a_run_started_over_http_is_listed_detailed_counted_and_has_its_history(
    backend_settings: Settings,
) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        reply = await command(http, "start_run", {"workflow": "greet", "input": {"name": "ada"}})
        assert reply["ok"] is True and reply["created"] is True
        started = await http.get(
            f"/runs/{reply['run_id']}", params={"min_position": reply["position"]}
        )
        assert started.status_code == 200  # read-your-writes: the run is there at once
        run = await ended(http, reply["run_id"])
        assert run["status"] == "completed"
        assert run["output"] == {"greeting": "HELLO ADA"}
        assert [(s["name"], s["status"], s["attempts"]) for s in run["steps"]] == [
            ("hello", "completed", 1),
            ("shout", "completed", 1),
        ]
        listed = (await http.get("/runs", params={"workflow": "greet"})).json()
        assert [r["run_id"] for r in listed["items"]] == [reply["run_id"]]
        assert listed["next_cursor"] is None
        workflows = {w["name"]: w for w in (await http.get("/workflows")).json()}
        assert workflows["greet"]["runs"] == {"completed": 1}
        history = (await http.get(f"/runs/{reply['run_id']}/history")).json()["events"]
        kinds = [e["type"] for e in history if e["type"] != "TaskDispatched"]
        assert kinds == [
            "RunStarted",
            "StepStarted",
            "StepCompleted",
            "StepStarted",
            "StepCompleted",
            "RunCompleted",
        ]
        projections = (await http.get("/projections")).json()
        assert {p["name"] for p in projections} == {"runs", "workflows", "inbound_events"}

    on_api(backend_settings, scenario)


def test_a_failed_step_shows_its_error_and_a_waiting_run_can_be_cancelled(
    backend_settings: Settings,
) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        failing = await command(http, "start_run", {"workflow": "fragile"})
        run = await ended(http, failing["run_id"])
        assert run["status"] == "failed"
        assert run["error"]["message"] == "step 'charge' failed: NonRetryableError: card declined"
        step = run["steps"][0]
        assert (step["name"], step["status"]) == ("charge", "failed")
        assert step["error"]["type"] == "NonRetryableError"

        waiting_run = await command(http, "start_run", {"workflow": "patient"})
        await run_where(
            http, waiting_run["run_id"], lambda r: r["status"] == "waiting", "the run waits"
        )
        await command(http, "cancel_run", {"run_id": waiting_run["run_id"], "reason": "bored"})
        cancelled = await ended(http, waiting_run["run_id"])
        assert (cancelled["status"], cancelled["cancel_reason"]) == ("cancelled", "bored")

    on_api(backend_settings, scenario)


def test_an_event_sent_over_http_starts_the_runs_it_triggers(backend_settings: Settings) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        sent = await command(http, "send_event", {"name": "order.placed", "data": {"order": 7}})
        event_id = sent["event_id"]

        async def triggered() -> bool:
            response = await http.get(f"/events/{event_id}")
            return response.status_code == 200 and bool(response.json()["triggered"])

        await waiting.until(triggered, "the triggered run", DEADLINE)
        event = (await http.get(f"/events/{event_id}")).json()
        assert [t["workflow"] for t in event["triggered"]] == ["on_order"]
        run = await ended(http, event["triggered"][0]["run_id"])
        assert (run["status"], run["output"]) == ("completed", "got 7")

    on_api(backend_settings, scenario)


def test_bad_input_gets_a_structured_error_and_changes_nothing(backend_settings: Settings) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        before = (await http.get("/projections")).json()
        for name, body, status, code in [
            ("start_run", {"workflow": "nope"}, 404, "unknown_workflow"),
            ("start_run", {"workflo": "greet"}, 400, "invalid_command"),
            (
                "cancel_run",
                {"run_id": "00000000-0000-0000-0000-000000000001"},
                404,
                "run_not_found",
            ),
            ("no_such_command", {}, 400, "invalid_command"),
        ]:
            response = await http.post(f"/commands/{name}", json=body)
            assert response.status_code == status, (name, response.text)
            assert response.json()["ok"] is False
            assert response.json()["error"]["code"] == code
        assert (await http.get(f"/runs/{UNKNOWN}")).status_code == 404
        after = (await http.get("/projections")).json()
        assert [p["head"] for p in after] == [p["head"] for p in before]

    on_api(backend_settings, scenario)


def test_a_projection_rebuilt_through_the_api_still_has_every_run(
    backend_settings: Settings,
) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        reply = await command(http, "start_run", {"workflow": "greet", "input": {"name": "bo"}})
        before = await ended(http, reply["run_id"])
        started = await http.post("/projections/runs/rebuild")
        assert started.status_code == 202, started.text
        assert started.json()["state"] in {"running", "done"}

        async def rebuilt() -> bool:
            outcome = (await http.get("/projections/runs/rebuild")).json()
            assert outcome["state"] != "failed", outcome
            return bool(outcome["state"] == "done")

        await waiting.until(rebuilt, "the rebuild", DEADLINE)
        after = (await http.get(f"/runs/{reply['run_id']}")).json()
        assert after == before
        unknown = await http.post("/projections/nope/rebuild")
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "not_found")

    on_api(backend_settings, scenario)
