"""The read-model HTTP API on real PostgreSQL and nats-server: every endpoint, end to end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import httpx
import nats
import nats.errors
import nats.js.errors
import pytest
from fastapi import FastAPI
from nats.aio.client import Client
from nats.aio.msg import Msg

from infrastructure import projection_runner
from infrastructure.bootstrap import bootstrap
from infrastructure.event_log import read_after
from infrastructure.http import app as api
from infrastructure.http.app import create_app, open_queries
from infrastructure.http.context import ApiContext
from infrastructure.nats import relay
from infrastructure.nats.command_service import CommandService
from infrastructure.nats.names import Names
from infrastructure.nats.requests import request
from infrastructure.postgres.read_models import catch_up, connect
from infrastructure.postgres.schema import PostgresParams
from infrastructure.settings import Settings
from projections.catalog import PROJECTIONS
from services import commands as c
from services.workflow_runs import WorkflowRuns
from tests.support import waiting
from tests.support.isolation import isolated
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RUN_FIELDS = {
    "run_id",
    "workflow",
    "key",
    "status",
    "input",
    "output",
    "error",
    "created_at",
    "updated_at",
    "steps",
}
STEP_FIELDS = {"name", "status", "attempts", "output", "error", "started_at", "finished_at"}
DEADLINE = 15.0
"""Seconds any condition a test waits on gets before the test fails."""


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def settings(postgres_server_url: str) -> Iterator[Settings]:
    """A database and a subject prefix of this test's own; its streams are deleted after."""
    with isolated(postgres_server_url, max_command_bytes=4096) as own:
        yield own


@pytest.fixture
def store(settings: Settings) -> Iterator[WorkflowRuns]:
    app = bootstrap(settings)
    try:
        yield app
    finally:
        app.close()


@asynccontextmanager
async def serving(
    settings: Settings, **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """The app with its lifespan run, and an HTTP client that calls it in-process."""
    app = create_app(settings, **options)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://ledgerflow") as client,
    ):
        yield client, app


def context(app: FastAPI) -> ApiContext:
    ctx: ApiContext = app.state.ledgerflow
    return ctx


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    await waiting.until(condition, what, DEADLINE)


# --------------------------------------------------------------------------- workload
class Seeded:
    """Runs in several states, an inbound event, and a registered workflow."""

    def __init__(self, store: WorkflowRuns) -> None:
        self.store = store
        store.register_workflow(
            c.RegisterWorkflow(name="shop", triggers=["shop.wanted"], worker_id="w1")
        )
        self.runs = [
            store.start_run(c.StartRun(workflow="shop", input={"n": n}, key=f"k{n}")).run_id
            for n in range(5)
        ]
        self.stepped, self.failed = self.runs[0], self.runs[1]
        store.start_step(c.StartStep(run_id=self.stepped, step="charge", attempt=1))
        store.complete_step(
            c.CompleteStep(run_id=self.stepped, step="charge", attempt=1, output={"id": 7})
        )
        store.fail_run(
            c.FailRun(run_id=self.failed, error=c.StepError(type="Fatal", message="declined"))
        )
        self.event_id = store.send_event(
            c.SendEvent(name="shop.shipped", data={"parcel": 1}, id="parcel-1")
        ).event_id

    def head(self) -> int:
        return self.store.recorder.max_notification_id() or 0

    def project(self, settings: Settings) -> None:
        """Bring every read model up to the store's head, as the projection runner would."""
        with connect(settings) as conn:
            for name in PROJECTIONS:
                catch_up(conn, settings.db_schema, name, partial(read_after, self.store))


# ------------------------------------------------------------------------------ reads
def test_run_queries_answer_typed_bodies_and_error_bodies(
    settings: Settings, store: WorkflowRuns
) -> None:
    seeded = Seeded(store)
    seeded.project(settings)

    async def scenario() -> None:
        async with serving(settings) as (http, _):
            everything = (await http.get("/runs", params={"limit": 500})).json()
            assert everything["next_cursor"] is None
            assert {r["run_id"] for r in everything["items"]} == {str(r) for r in seeded.runs}
            created = [r["created_at"] for r in everything["items"]]
            assert created == sorted(created, reverse=True)

            paged, cursor = [], None
            while True:
                params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
                page = (await http.get("/runs", params=params)).json()
                paged += page["items"]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert paged == everything["items"]

            failed = (await http.get("/runs", params={"status": "failed"})).json()["items"]
            assert [(r["run_id"], r["error_type"]) for r in failed] == [
                (str(seeded.failed), "Fatal")
            ]
            nobody = (await http.get("/runs", params={"workflow": "nobody"})).json()
            assert nobody == {"items": [], "next_cursor": None}
            middle = everything["items"][2]["created_at"]
            newer = (await http.get("/runs", params={"created_after": middle})).json()["items"]
            older = (await http.get("/runs", params={"created_before": middle})).json()["items"]
            assert newer + older == everything["items"]

            detail = (await http.get(f"/runs/{seeded.stepped}")).json()
            assert detail.keys() >= RUN_FIELDS
            assert (detail["workflow"], detail["key"], detail["input"]) == ("shop", "k0", {"n": 0})
            assert [s.keys() >= STEP_FIELDS for s in detail["steps"]] == [True]
            step = detail["steps"][0]
            assert (step["name"], step["status"], step["attempts"]) == ("charge", "completed", 1)
            assert step["output"] == {"id": 7}

            workflows = (await http.get("/workflows")).json()
            assert [(w["name"], w["triggers"], w["workers"]) for w in workflows] == [
                ("shop", ["shop.wanted"], ["w1"])
            ]
            assert workflows[0]["runs"] == {"failed": 1, "running": 1, "queued": 3}

            event = (await http.get(f"/events/{seeded.event_id}")).json()
            assert (event["name"], event["data"], event["external_id"]) == (
                "shop.shipped",
                {"parcel": 1},
                "parcel-1",
            )

            projections = (await http.get("/projections")).json()
            assert sorted(p["name"] for p in projections) == sorted(PROJECTIONS)
            for p in projections:
                assert p == {
                    "name": p["name"],
                    "position": seeded.head(),
                    "head": seeded.head(),
                    "lag": 0,
                    "state": "live",
                }

    asyncio.run(scenario())


def test_history_comes_from_the_event_store_at_global_positions(
    settings: Settings, store: WorkflowRuns
) -> None:
    seeded = Seeded(store)  # never projected: the history does not need the read models
    run_id = seeded.stepped
    positions = [
        n.id
        for n in store.recorder.select_notifications(start=1, limit=1000)
        if n.originator_id == run_id
    ]
    domain_events = list(store.events.get(run_id))

    async def scenario() -> None:
        async with serving(settings) as (http, _):
            response = await http.get(f"/runs/{run_id}/history")
            assert response.status_code == 200
            events = response.json()["events"]
            assert [e["position"] for e in events] == positions
            assert [e["version"] for e in events] == [e.originator_version for e in domain_events]
            assert [e["type"] for e in events] == [type(e).__name__ for e in domain_events]
            assert set(events[0]) == {"position", "version", "type", "timestamp", "data"}
            completed = next(e for e in events if e["type"] == "StepCompleted")
            assert completed["data"]["output"] == {"id": 7}
            # The store is always current: a position far ahead is nothing to wait for.
            ahead = await http.get(f"/runs/{run_id}/history", params={"min_position": 10**9})
            assert ahead.json()["events"] == events

            for unknown in (uuid.uuid4(), seeded.event_id):  # an inbound event is not a run
                missing = await http.get(f"/runs/{unknown}/history")
                assert missing.status_code == 404
                assert missing.json()["error"]["code"] == "run_not_found"

    asyncio.run(scenario())


def test_every_error_has_the_error_body_and_its_status(
    settings: Settings, store: WorkflowRuns
) -> None:
    seeded = Seeded(store)
    seeded.project(settings)

    async def scenario() -> None:
        async with serving(settings) as (http, _):
            unknown = uuid.uuid4()
            missing = await http.get(f"/runs/{unknown}")
            assert (missing.status_code, missing.json()) == (
                404,
                {
                    "ok": False,
                    "error": {
                        "code": "run_not_found",
                        "message": f"run {unknown} not found",
                        "details": [],
                    },
                },
            )
            assert (await http.get(f"/events/{unknown}")).json()["error"]["code"] == "not_found"

            malformed = await http.get("/runs/not-a-uuid")
            assert malformed.status_code == 400
            error = malformed.json()["error"]
            assert error["code"] == "invalid_command"
            assert error["details"][0]["loc"] == ["path", "run_id"]

            bad_queries: list[dict[str, Any]] = [
                {"cursor": "not a cursor"},
                {"status": "asleep"},
                {"limit": 0},
                {"limit": 501},
                {"limit": "many"},
                {"created_after": "2026-01-01T00:00:00"},  # no time zone
                {"created_before": "yesterday"},
                {"min_position": -1},
            ]
            for params in bad_queries:
                response = await http.get("/runs", params=params)
                body = response.json()
                assert response.status_code == 400, params
                assert body["ok"] is False and body["error"]["code"] == "invalid_command", params
                assert body["error"]["message"], params

            nowhere = await http.get("/nowhere")
            assert (nowhere.status_code, nowhere.json()["error"]["code"]) == (404, "not_found")
            wrong_method = await http.delete("/runs")
            assert wrong_method.status_code == 405
            assert wrong_method.json()["error"]["code"] == "method_not_allowed"

    asyncio.run(scenario())


# ------------------------------------------------------------------- read-your-writes
def test_min_position_waits_for_the_projection_then_answers_or_says_it_is_behind(
    settings: Settings, store: WorkflowRuns
) -> None:
    seeded = Seeded(store)  # in the store, not yet in the read models
    head = seeded.head()

    async def scenario() -> None:
        async with serving(settings, max_wait=DEADLINE) as (http, app):
            run = f"/runs/{seeded.stepped}"
            assert (await http.get(run)).status_code == 404  # not projected yet

            reads = [f"{run}?min_position={head}"] * 10
            reads += [
                f"/workflows?min_position={head}",
                f"/events/{seeded.event_id}?min_position={head}",
            ]
            waiting = [asyncio.create_task(http.get(path)) for path in reads]
            watcher = context(app).watcher

            async def all_waiting() -> bool:
                return watcher.waiting == len(reads)

            await until(all_waiting, "every read to wait for the projections")
            await asyncio.to_thread(seeded.project, settings)
            answers = await asyncio.gather(*waiting)
            assert [a.status_code for a in answers] == [200] * len(reads)
            assert answers[0].json()["steps"][0]["name"] == "charge"
            assert answers[-2].json()[0]["runs"]["queued"] == 3
            assert answers[-1].json()["name"] == "shop.shipped"
            # Already there: answered at once, from the positions seen last.
            assert (await http.get(run, params={"min_position": head})).status_code == 200

        async with serving(settings, max_wait=0.3) as (http, _):
            ahead = head + 1000
            behind = await http.get(f"/runs/{seeded.stepped}", params={"min_position": ahead})
            assert behind.status_code == 503
            assert behind.headers["retry-after"] == "1"
            assert behind.json()["error"]["code"] == "projection_behind"
            assert behind.json()["error"]["details"] == [
                {"projection": "runs", "position": head, "wanted": ahead}
            ]
            workflows = await http.get("/workflows", params={"min_position": ahead})
            assert {d["projection"] for d in workflows.json()["error"]["details"]} == {
                "workflows",
                "runs",
            }
            for path in ("/runs", "/projections", f"/events/{seeded.event_id}"):
                response = await http.get(path, params={"min_position": ahead})
                assert response.json()["error"]["code"] == "projection_behind", path

    asyncio.run(scenario())


# ---------------------------------------------------------------- operations endpoints
def test_health_metrics_and_openapi(settings: Settings, store: WorkflowRuns) -> None:
    Seeded(store).project(settings)

    async def scenario() -> None:
        async with serving(settings) as (http, _):
            health = await http.get("/healthz")
            assert (health.status_code, health.json()) == (
                200,
                {"ok": True, "checks": {"database": "ok", "nats": "ok"}},
            )
            scrape = await http.get("/metrics")
            assert scrape.headers["content-type"].startswith("text/plain")
            text = scrape.text
            assert 'ledgerflow_projection_lag_events{projection="runs"} 0.0' in text
            assert "ledgerflow_commands_total" in text
            assert (
                'ledgerflow_http_requests_total{method="GET",route="/healthz",status="200"}' in text
            )

            schema = (await http.get("/openapi.json")).json()
            assert set(schema["paths"]) >= {
                "/runs",
                "/runs/{run_id}",
                "/runs/{run_id}/history",
                "/workflows",
                "/events/{event_id}",
                "/projections",
                "/healthz",
                "/metrics",
                "/commands/{name}",
            }
            runs = schema["paths"]["/runs"]["get"]
            assert {p["name"] for p in runs["parameters"]} >= {
                "workflow",
                "status",
                "limit",
                "cursor",
                "created_after",
                "created_before",
                "min_position",
            }
            assert "422" not in runs["responses"]
            assert runs["responses"]["400"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"
            }

    asyncio.run(scenario())


def test_unhealthy_dependencies_answer_503_naming_them(settings: Settings) -> None:
    nothing_listens = replace(PostgresParams.from_url(settings.database_url), port=str(free_port()))
    dead = settings.model_copy(update={"database_url": nothing_listens.url()})

    async def scenario() -> None:
        queries = await asyncio.to_thread(open_queries, dead, 0.5)
        nc = await nats.connect(settings.nats_url)
        try:
            async with serving(settings, queries=queries, nats_client=nc, health_timeout=0.5) as (
                http,
                _,
            ):
                await nc.close()  # NATS is gone too
                health = await http.get("/healthz")
                assert health.status_code == 503
                error = health.json()["error"]
                assert error["code"] == "unavailable"
                assert {d["dependency"] for d in error["details"]} == {"database", "nats"}

                runs = await http.get("/runs")
                assert (runs.status_code, runs.json()["error"]["code"]) == (503, "unavailable")
                command = await http.post("/commands/start_run", json={"workflow": "shop"})
                assert (command.status_code, command.json()["error"]["code"]) == (
                    503,
                    "unavailable",
                )
                assert (await http.get("/metrics")).status_code == 200  # lag is just not fresh
        finally:
            await asyncio.to_thread(queries.close)
            await nc.close()

    asyncio.run(scenario())


# ----------------------------------------------------------------- commands over HTTP
def test_commands_over_http_are_checked_here_and_answer_503_without_a_command_service(
    settings: Settings,
) -> None:
    names = Names(settings.subject_prefix)

    async def scenario() -> None:
        async with serving(settings, command_timeout=0.3) as (http, _):
            nobody = await http.post("/commands/start_run", json={"workflow": "shop"})
            assert (nobody.status_code, nobody.json()["error"]["code"]) == (503, "unavailable")

            refused: list[tuple[str, dict[str, Any], int, str]] = [
                ("launch_rocket", {"json": {}}, 400, "invalid_command"),
                ("start_run", {"content": b"{not json"}, 400, "invalid_command"),
                ("start_run", {"json": [1, 2]}, 400, "invalid_command"),
                ("start_run", {"json": {"workflow": "x", "surprise": 1}}, 400, "invalid_command"),
                ("start_run", {"json": {"input": "x" * 5000}}, 413, "too_large"),
                ("start_run", {"content": _chunks(b"x" * 5000)}, 413, "too_large"),
            ]
            for name, body, status, code in refused:
                response = await http.post(f"/commands/{name}", **body)
                assert (response.status_code, response.json()["error"]["code"]) == (status, code)
            assert (await http.post("/commands/a.b", json={})).status_code == 400

            silent = await nats.connect(settings.nats_url)

            async def ignore(msg: Msg) -> None:
                """A command service that never answers."""

            try:
                await silent.subscribe(names.command("start_run"), cb=ignore)
                await silent.flush()
                slow = await http.post("/commands/start_run", json={"workflow": "shop"})
                assert (slow.status_code, slow.json()["error"]["code"]) == (503, "unavailable")
                assert "command_id" in slow.json()["error"]["message"]
            finally:
                await silent.close()

    asyncio.run(scenario())


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    """A body without Content-Length: the limit must hold while streaming."""
    for start in range(0, len(data), 1000):
        yield data[start : start + 1000]


# ------------------------------------------------------------------------ end to end
def test_end_to_end_a_command_then_its_run_is_read_at_its_position(settings: Settings) -> None:
    """Command service, relay, projection runner and the API served by uvicorn, all real."""
    own = settings.model_copy(update={"api_port": free_port()})
    names = Names(own.subject_prefix)

    async def scenario() -> None:
        stop = asyncio.Event()
        store = await asyncio.to_thread(bootstrap, own)
        server, client = await nats.connect(own.nats_url), await nats.connect(own.nats_url)
        service = CommandService(store, names, max_bytes=own.max_command_bytes)
        await service.start(server)
        roles = [
            asyncio.create_task(relay.run(own, stop), name="relay"),
            asyncio.create_task(projection_runner.run(own, stop), name="projections"),
            asyncio.create_task(api.run(own, stop), name="api"),
        ]
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{own.api_port}") as http:
                await _healthy(http, roles)
                await _read_your_writes(http, client, names)
        finally:
            stop.set()
            results = await asyncio.gather(*roles, return_exceptions=True)
            await service.stop()
            await client.close()
            await server.close()
            await asyncio.to_thread(store.close)
        assert [r for r in results if r is not None] == []

    asyncio.run(scenario())


async def _healthy(http: httpx.AsyncClient, roles: list[asyncio.Task[None]]) -> None:
    async def answers() -> bool:
        for role in roles:
            if role.done():
                role.result()  # a role that died says why
                raise AssertionError(f"{role.get_name()} stopped")
        with contextlib.suppress(httpx.TransportError):
            return (await http.get("/healthz")).status_code == 200
        return False

    await until(answers, "the API to answer /healthz")


async def _read_your_writes(http: httpx.AsyncClient, client: Client, names: Names) -> None:
    async def nats_command(name: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = await request(client, names.command(name), json.dumps(body).encode(), 10)
        result: dict[str, Any] = json.loads(reply.data)
        return result

    assert (await nats_command("register_workflow", {"name": "shop"}))["ok"]
    started = await nats_command("start_run", {"workflow": "shop", "input": {"n": 1}})
    assert started["ok"], started
    # No retry loop: min_position does the waiting.
    run = await http.get(f"/runs/{started['run_id']}", params={"min_position": started["position"]})
    assert run.status_code == 200, run.json()
    assert (run.json()["status"], run.json()["input"]) == ("queued", {"n": 1})

    posted = await http.post("/commands/start_run", json={"workflow": "shop", "key": "k1"})
    assert posted.status_code == 200, posted.json()
    reply = posted.json()
    assert set(reply) == set(started) == {"ok", "run_id", "created", "position"}
    assert reply["created"] is True
    run = await http.get(f"/runs/{reply['run_id']}", params={"min_position": reply["position"]})
    assert (run.status_code, run.json()["key"]) == (200, "k1")
    again = await http.post("/commands/start_run", json={"workflow": "shop", "key": "k1"})
    assert (again.json()["run_id"], again.json()["created"]) == (reply["run_id"], False)

    history = (await http.get(f"/runs/{reply['run_id']}/history")).json()["events"]
    assert history[-1]["position"] == reply["position"]

    done = await http.post("/commands/complete_run", json={"run_id": reply["run_id"]})
    assert done.status_code == 200
    refusals: list[tuple[str, dict[str, Any], int, str]] = [
        ("start_run", {"workflow": "nobody"}, 404, "unknown_workflow"),
        ("start_run", {"workflow": "shop", "eager": True}, 400, "invalid_command"),
        ("start_run", {"workflow": "shop", "eager": "true"}, 400, "invalid_command"),
        ("start_run", {"workflow": "shop", "eager": 1}, 400, "invalid_command"),
        ("start_run", {"workflow": "shop", "first_step": {"step": "s"}}, 400, "invalid_command"),
        ("cancel_run", {"run_id": str(uuid.uuid4())}, 404, "run_not_found"),
        (
            "start_step",
            {"run_id": reply["run_id"], "step": "s", "attempt": 1},
            409,
            "invalid_state",
        ),
    ]
    for name, body, status, code in refusals:
        response = await http.post(f"/commands/{name}", json=body)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), name

    last = done.json()["position"]
    projections = (await http.get("/projections", params={"min_position": last})).json()
    assert [p["lag"] for p in projections] == [0] * len(PROJECTIONS)
    completed = await http.get("/runs", params={"status": "completed", "min_position": last})
    assert [r["run_id"] for r in completed.json()["items"]] == [reply["run_id"]]

    scrape = (await http.get("/metrics")).text
    assert 'ledgerflow_commands_total{name="start_run",outcome="ok"}' in scrape
    assert 'ledgerflow_commands_total{name="start_run",outcome="unknown_workflow"}' in scrape
    assert 'ledgerflow_projection_lag_events{projection="runs"} 0.0' in scrape
    assert f"ledgerflow_store_head_position {float(last)}" in scrape
    appended = [
        line for line in scrape.splitlines() if line.startswith("ledgerflow_events_appended")
    ]
    assert appended and float(appended[0].split()[-1]) > 0
