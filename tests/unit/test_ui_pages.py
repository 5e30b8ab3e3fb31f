"""The web UI's pages on an ApiContext that is not PostgreSQL nor NATS: an in-memory store,
read models derived from it, and a gateway that applies commands to it, as an embedded
backend would supply."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast
from uuid import UUID, uuid4

import httpx
import pytest
from fastapi import FastAPI

from domain.errors import DomainError
from domain.values import JSON
from domain.workflow_run import WorkflowRun
from infrastructure.http.context import ApiContext, Limits, RebuildOutcome
from infrastructure.http.errors import ApiError, install_error_handlers
from infrastructure.http.freshness import PositionWatcher
from infrastructure.http.ui import install_ui
from infrastructure.nats.command_service import CommandError, error_body, parse_command
from infrastructure.postgres.queries import ReadModelQueries, RunDetail, RunPage, RunSummary
from infrastructure.postgres.read_models import ProjectionStatus
from infrastructure.settings import Settings
from services import commands as c
from services.workflow_runs import RunStartedReply, WorkflowRuns


class MemoryQueries:
    """Read models computed from the in-memory store on each query."""

    def __init__(self, store: WorkflowRuns) -> None:
        self.store = store
        self.runs: list[UUID] = []

    def _run(self, run_id: UUID) -> WorkflowRun | None:
        try:
            return self.store.get_run(run_id)
        except DomainError:
            return None

    def list_runs_page(self, **filters: Any) -> RunPage:
        found = [r for r in map(self._run, reversed(self.runs)) if r is not None]
        items = [
            RunSummary(
                run_id=r.id,
                workflow=r.workflow,
                key=r.key,
                status=r.status.value,
                error_type=str(r.error["type"]) if r.error else None,
                created_at=r.created_on,
                updated_at=r.modified_on,
                parent_run_id=None,
            )
            for r in found
            if filters.get("workflow") in (None, r.workflow)
            and filters.get("status") in (None, r.status.value)
        ]
        return RunPage(items=items, next_cursor=None)

    def get_run(self, run_id: UUID) -> RunDetail | None:
        run = self._run(run_id)
        if run is None:
            return None
        return RunDetail(
            run_id=run.id,
            workflow=run.workflow,
            key=run.key,
            status=run.status.value,
            input=run.input,
            output=run.output,
            error=run.error,
            created_at=run.created_on,
            updated_at=run.modified_on,
            cancel_requested=run.cancel_requested,
            steps=[],
            sleeps=[],
            waits=[],
            children=[],
            sent_events=[],
            version=run.version,
        )

    def list_workflows(self) -> list[Any]:
        return []

    def projections(self) -> list[ProjectionStatus]:
        head = self.store.recorder.max_notification_id() or 0
        return [ProjectionStatus("runs", 1, head, head, 0, "live")]

    def projection_positions(self) -> dict[str, int]:
        return {p.name: p.position for p in self.projections()}


class EngineGateway:
    """Commands applied to the store in process, as the embedded backend does."""

    dependency = "engine"

    def __init__(self, store: WorkflowRuns) -> None:
        self.store = store
        self.sent: list[tuple[str, dict[str, JSON]]] = []

    async def send(self, name: str, payload: bytes) -> dict[str, JSON]:
        self.sent.append((name, json.loads(payload)))
        try:
            command = parse_command(name, payload, 1 << 20)
        except CommandError as e:
            raise ApiError(e.code, e.message, e.details) from None
        try:
            reply = self.store.handle(command)
        except DomainError as e:
            return error_body(e.code, str(e))
        return reply.to_json()

    async def check(self, timeout: float) -> None:
        return None


@dataclass
class FakeRebuilder:
    asked: list[str] = field(default_factory=list)

    async def rebuild(self, projection: str) -> None:
        if projection != "runs":
            raise ApiError("not_found", f"no projection {projection!r}")
        self.asked.append(projection)

    def outcomes(self) -> Mapping[str, RebuildOutcome]:
        now = datetime.now(UTC)
        return {p: RebuildOutcome(p, "done", now, now) for p in self.asked}


@dataclass
class Ui:
    http: httpx.AsyncClient
    store: WorkflowRuns
    queries: MemoryQueries
    commands: EngineGateway

    def start(self, workflow: str = "shop") -> UUID:
        self.store.handle(c.RegisterWorkflow(name=workflow))
        reply = self.store.handle(c.StartRun(workflow=workflow, input={"n": 1}))
        assert isinstance(reply, RunStartedReply)
        self.queries.runs.append(reply.run_id)
        return reply.run_id


@pytest.fixture
def store() -> Iterator[WorkflowRuns]:
    app = WorkflowRuns(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    try:
        yield app
    finally:
        app.close()


@asynccontextmanager
async def ui(store: WorkflowRuns, rebuilder: FakeRebuilder | None = None) -> AsyncIterator[Ui]:
    queries, commands = MemoryQueries(store), EngineGateway(store)

    async def positions() -> dict[str, int]:
        return queries.projection_positions()

    app = FastAPI()
    install_error_handlers(app)
    install_ui(app)
    app.state.ledgerflow = ApiContext(
        settings=Settings(),
        limits=Limits(max_wait=0.5),
        queries=cast(ReadModelQueries, queries),
        store=store,
        commands=commands,
        watcher=PositionWatcher(positions),
        rebuilder=rebuilder,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ui") as http:
        yield Ui(http, store, queries, commands)


def test_the_runs_page_lists_runs_and_polls_a_fragment_of_the_same_filters(
    store: WorkflowRuns,
) -> None:
    async def scenario() -> None:
        async with ui(store) as u:
            shop, mail = u.start("shop"), u.start("mail")
            page = await u.http.get("/ui/runs")
            assert page.status_code == 200
            assert str(shop) in page.text and str(mail) in page.text
            assert 'hx-get="/ui/runs/rows"' in page.text
            assert "/ui/static/htmx.min.js" in page.text

            rows = await u.http.get("/ui/runs/rows", params={"workflow": "mail"})
            assert str(mail) in rows.text and str(shop) not in rows.text
            assert 'hx-get="/ui/runs/rows?workflow=mail"' in rows.text
            assert "<html" not in rows.text

            bad = await u.http.get("/ui/runs", params={"status": "sideways"})
            assert bad.status_code == 400  # the memory queries ignore it; the UI does not
            assert "text/html" in bad.headers["content-type"]

            assert (await u.http.get("/ui/", follow_redirects=True)).url.path == "/ui/runs"

    asyncio.run(scenario())


def test_a_run_page_shows_the_failed_attempt_with_its_error_and_traceback(
    store: WorkflowRuns,
) -> None:
    async def scenario() -> None:
        async with ui(store) as u:
            run_id = u.start()
            store.handle(c.StartStep(run_id=run_id, step="charge", attempt=1))
            error = c.StepError.model_validate(
                {"type": "CardDeclined", "message": "declined <b>", "traceback": "Traceback: x"}
            )
            store.handle(
                c.FailStep(run_id=run_id, step="charge", attempt=1, error=error, retryable=False)
            )
            page = await u.http.get(f"/ui/runs/{run_id}")
            assert page.status_code == 200
            assert 'data-name="charge" data-attempt="1"' in page.text
            assert "CardDeclined" in page.text
            assert "declined &lt;b&gt;" in page.text  # escaped
            assert "Traceback: x" in page.text
            assert "StepFailed" in page.text  # the raw history

            live = await u.http.get(f"/ui/runs/{run_id}/live")  # what the page polls
            assert live.status_code == 200
            assert "<html" not in live.text and "Traceback: x" in live.text

    asyncio.run(scenario())


@pytest.mark.parametrize("run_id", [str(uuid4()), "not-a-run-id"])
def test_an_unknown_run_is_a_friendly_404_page(store: WorkflowRuns, run_id: str) -> None:
    async def scenario() -> None:
        async with ui(store) as u:
            page = await u.http.get(f"/ui/runs/{run_id}")
            assert page.status_code == 404
            assert "text/html" in page.headers["content-type"]
            assert "Run not found" in page.text and run_id in page.text

    asyncio.run(scenario())


def test_cancel_goes_through_the_gateway_and_shows_the_run_as_of_its_position(
    store: WorkflowRuns,
) -> None:
    async def scenario() -> None:
        async with ui(store) as u:
            run_id = u.start()
            page = await u.http.get(f"/ui/runs/{run_id}")
            command_id = re.search(r'name="command_id" value="([^"]+)"', page.text)
            assert command_id is not None
            form = {"command_id": command_id[1], "reason": "not needed"}
            done = await u.http.post(f"/ui/runs/{run_id}/cancel", data=form)
            assert done.status_code == 303
            assert done.headers["location"].startswith(f"/ui/runs/{run_id}?min_position=")
            after = await u.http.get(done.headers["location"])
            assert 'class="status status-cancelled"' in after.text
            assert u.commands.sent == [
                (
                    "cancel_run",
                    {"run_id": str(run_id), "reason": "not needed", "command_id": command_id[1]},
                )
            ]

    asyncio.run(scenario())


def test_a_refused_command_is_shown_on_the_page_and_changes_nothing(
    store: WorkflowRuns,
) -> None:
    async def scenario() -> None:
        async with ui(store) as u:
            run_id = u.start()  # queued: not failed, so it cannot be retried
            head = store.recorder.max_notification_id()
            refused = await u.http.post(f"/ui/runs/{run_id}/retry", data={})
            assert refused.status_code == 409
            assert "retry_run was refused (invalid_state)" in refused.text
            assert "only a failed run retries" in refused.text
            assert store.recorder.max_notification_id() == head

            malformed = await u.http.post(f"/ui/runs/{uuid4()}x/retry", data={})
            assert malformed.status_code == 400
            assert "retry_run was refused (invalid_command)" in malformed.text

    asyncio.run(scenario())


def test_a_form_posted_from_another_site_is_refused(store: WorkflowRuns) -> None:
    async def scenario() -> None:
        async with ui(store) as u:
            run_id = u.start()
            forged = await u.http.post(
                f"/ui/runs/{run_id}/cancel", data={}, headers={"sec-fetch-site": "cross-site"}
            )
            assert forged.status_code == 401
            assert u.commands.sent == []
            assert store.get_run(run_id).status.value == "queued"

    asyncio.run(scenario())


def test_the_rebuild_button_is_there_only_with_a_rebuilder(store: WorkflowRuns) -> None:
    async def scenario() -> None:
        async with ui(store) as u:
            page = await u.http.get("/ui/projections")
            assert page.status_code == 200
            assert 'data-projection="runs"' in page.text
            assert "Rebuild runs" not in page.text
            refused = await u.http.post("/ui/projections/runs/rebuild")
            assert refused.status_code == 404

        rebuilder = FakeRebuilder()
        async with ui(store, rebuilder) as u:
            page = await u.http.get("/ui/projections")
            assert "Rebuild runs" in page.text
            done = await u.http.post("/ui/projections/runs/rebuild")
            assert (done.status_code, done.headers["location"]) == (303, "/ui/projections")
            assert rebuilder.asked == ["runs"]
            rows = await u.http.get("/ui/projections/rows")
            assert 'data-rebuild="runs" data-outcome="done"' in rows.text
            unknown = await u.http.post("/ui/projections/nope/rebuild")
            assert unknown.status_code == 404
            assert "no projection &#39;nope&#39;" in unknown.text

    asyncio.run(scenario())
