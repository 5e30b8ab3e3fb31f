"""The API's routes: read models, a run's history, projections, health, metrics, commands."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter, ValidationError

from domain.workflow_run import RunStatus
from infrastructure import codec, metrics
from infrastructure.http.commands import read_body
from infrastructure.http.context import ApiContext, api_context
from infrastructure.http.errors import RETRY_AFTER_SECONDS, ApiError, error_response, status_of
from infrastructure.http.history import run_history
from infrastructure.http.models import (
    ErrorBody,
    Health,
    ProjectionInfo,
    RebuildInfo,
    RunHistory,
)
from infrastructure.postgres.queries import (
    MAX_LIMIT,
    InboundEventDetail,
    RunDetail,
    RunPage,
    WorkflowSummary,
)
from projections.catalog import PROJECTIONS
from projections.inbound_events import InboundEventProjection
from projections.runs import RunProjection
from projections.workflows import WorkflowProjection
from services.workflow_runs import COMMANDS

log = logging.getLogger("ledgerflow.api")

RUNS = (RunProjection.name,)
WORKFLOWS = (WorkflowProjection.name, RunProjection.name)  # run counts come from "runs"
INBOUND_EVENTS = (InboundEventProjection.name,)
EVERY_PROJECTION = tuple(PROJECTIONS)

Context = Annotated[ApiContext, Depends(api_context)]
MinPosition = Annotated[
    int | None,
    Query(
        ge=0,
        description="Wait (bounded) until the read model has applied this global position, "
        "e.g. a command reply's `position`; 503 `projection_behind` if it does not in time.",
    ),
]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in (400, *statuses)}


router = APIRouter()


@router.get(
    "/runs", response_model=RunPage, tags=["runs"], responses=_errors(503), summary="List runs"
)
async def list_runs(
    ctx: Context,
    min_position: MinPosition = None,
    workflow: str | None = None,
    status: RunStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
    created_after: Annotated[datetime | None, Query(description="inclusive, with a zone")] = None,
    created_before: Annotated[datetime | None, Query(description="exclusive, with a zone")] = None,
) -> RunPage:
    """Runs, newest first, a page at a time."""
    await ctx.fresh(RUNS, min_position)
    return await asyncio.to_thread(
        ctx.queries.list_runs_page,
        workflow=workflow,
        status=status.value if status is not None else None,
        limit=limit,
        cursor=cursor,
        created_after=created_after,
        created_before=created_before,
    )


@router.get("/runs/{run_id}", response_model=RunDetail, tags=["runs"], responses=_errors(404, 503))
async def get_run(ctx: Context, run_id: UUID, min_position: MinPosition = None) -> RunDetail:
    """A run with its steps, sleeps, waits, children and sent events."""
    await ctx.fresh(RUNS, min_position)
    run = await asyncio.to_thread(ctx.queries.get_run, run_id)
    if run is None:
        raise ApiError("run_not_found", f"run {run_id} not found")
    return run


@router.get(
    "/runs/{run_id}/history",
    response_model=RunHistory,
    tags=["runs"],
    responses=_errors(404, 503),
)
async def get_run_history(
    ctx: Context,
    run_id: UUID,
    min_position: Annotated[
        int | None, Query(ge=0, description="Accepted for symmetry: the store is always current")
    ] = None,
) -> RunHistory:
    """Every event of the run, from the event store (not a read model)."""
    events = await asyncio.to_thread(run_history, ctx.store, run_id)
    if events is None:
        raise ApiError("run_not_found", f"run {run_id} not found")
    return RunHistory(events=events)


@router.get(
    "/workflows", response_model=list[WorkflowSummary], tags=["workflows"], responses=_errors(503)
)
async def list_workflows(ctx: Context, min_position: MinPosition = None) -> list[WorkflowSummary]:
    """Registered workflows with their triggers, workers and run counts by status."""
    await ctx.fresh(WORKFLOWS, min_position)
    return await asyncio.to_thread(ctx.queries.list_workflows)


@router.get(
    "/events/{event_id}",
    response_model=InboundEventDetail,
    tags=["events"],
    responses=_errors(404, 503),
)
async def get_event(
    ctx: Context, event_id: UUID, min_position: MinPosition = None
) -> InboundEventDetail:
    """An inbound event and the runs it started or woke."""
    await ctx.fresh(INBOUND_EVENTS, min_position)
    event = await asyncio.to_thread(ctx.queries.get_event, event_id)
    if event is None:
        raise ApiError("not_found", f"event {event_id} not found")
    return event


@router.get(
    "/projections",
    response_model=list[ProjectionInfo],
    tags=["operations"],
    responses=_errors(503),
)
async def list_projections(ctx: Context, min_position: MinPosition = None) -> list[ProjectionInfo]:
    """Each projection's position, the store's head, the lag between them, and its state
    (`live`, or `building` during a rebuild)."""
    await ctx.fresh(EVERY_PROJECTION, min_position)
    found = await asyncio.to_thread(ctx.queries.projections)
    return [
        ProjectionInfo(name=p.name, position=p.position, head=p.head, lag=p.lag, state=p.state)
        for p in found
    ]


@router.post(
    "/projections/{name}/rebuild",
    response_model=RebuildInfo,
    status_code=202,
    tags=["operations"],
    responses=_errors(404, 409, 503),
)
async def start_rebuild(ctx: Context, name: str) -> RebuildInfo:
    """Rebuild projection ``name`` from the event store beside the live one, then swap it
    in; answers at once (202). `GET` the same path for the outcome."""
    if ctx.rebuilder is None:
        raise ApiError("unavailable", "this API cannot rebuild projections")
    await ctx.rebuilder.rebuild(name)
    return _rebuild_info(ctx, name)


@router.get(
    "/projections/{name}/rebuild",
    response_model=RebuildInfo,
    tags=["operations"],
    responses=_errors(404, 503),
)
async def get_rebuild(ctx: Context, name: str) -> RebuildInfo:
    """The last rebuild of projection ``name`` started through this API process."""
    if ctx.rebuilder is None:
        raise ApiError("unavailable", "this API cannot rebuild projections")
    return _rebuild_info(ctx, name)


def _rebuild_info(ctx: ApiContext, name: str) -> RebuildInfo:
    assert ctx.rebuilder is not None
    outcome = ctx.rebuilder.outcomes().get(name)
    if outcome is None:
        raise ApiError("not_found", f"no rebuild of {name!r} was started here")
    return RebuildInfo(
        projection=outcome.projection,
        state=outcome.state,
        started_at=outcome.started_at,
        finished_at=outcome.finished_at,
        error=outcome.error,
    )


@router.get(
    "/healthz",
    response_model=Health,
    tags=["operations"],
    responses={503: {"model": ErrorBody}},
)
async def healthz(ctx: Context) -> Health | JSONResponse:
    """200 when the database and NATS both answer quickly; else 503 naming the failures."""
    timeout = ctx.limits.health_timeout

    async def database() -> None:
        await asyncio.wait_for(asyncio.to_thread(ctx.queries.projections), timeout)

    async def commands() -> None:
        await ctx.commands.check(timeout)

    checks = {"database": database, ctx.commands.dependency: commands}
    results = await asyncio.gather(*(check() for check in checks.values()), return_exceptions=True)
    failed = [
        {"dependency": name, "error": str(result) or type(result).__name__}
        for name, result in zip(checks, results, strict=True)
        if isinstance(result, BaseException)
    ]
    if failed:
        log.warning("unhealthy: %s", failed)
        names = ", ".join(str(f["dependency"]) for f in failed)
        return error_response("unavailable", f"unavailable: {names}", failed)
    return Health(checks=dict.fromkeys(checks, "ok"))


@router.get(
    "/metrics",
    tags=["operations"],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
async def prometheus_metrics(ctx: Context) -> Response:
    """Prometheus text format; projection lag and the store's head are read on each scrape."""
    try:
        found = await asyncio.wait_for(
            asyncio.to_thread(ctx.queries.projections), ctx.limits.health_timeout
        )
    except Exception as e:  # a scrape still answers: the other metrics are worth having
        log.warning("projection lag not refreshed: %s", e)
    else:
        for p in found:
            metrics.STORE_HEAD.set(p.head)
            if p.state == "live":
                metrics.PROJECTION_LAG.labels(projection=p.name).set(p.lag)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/commands/{name}",
    tags=["commands"],
    responses={
        200: {"description": 'The command service\'s reply: `{"ok": true, ..., "position": int}`'},
        **_errors(404, 409, 413, 503),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
            "description": "The same JSON body as the NATS command",
        }
    },
)
async def post_command(
    ctx: Context,
    request: Request,
    name: Annotated[str, Path(description=f"One of: {', '.join(sorted(COMMANDS))}")],
) -> JSONResponse:
    """Forward a command to the command service over NATS and give back its reply."""
    max_bytes = ctx.settings.max_command_bytes
    payload = await read_body(request, max_bytes)
    if name == "start_run" and (field := _asks_eager(payload)) is not None:
        # The reply would hand the run to a worker the API does not have (ADR 17, 20).
        message = "an eager start is for a client with a worker in its process (the SDK)"
        return error_response("invalid_command", message, [{"loc": [field]}])
    reply = await ctx.commands.send(name, payload)
    if reply.get("ok") is True:
        return JSONResponse(reply)
    error = reply.get("error")
    code = str(error.get("code")) if isinstance(error, dict) else "internal"
    status = status_of(code)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    return JSONResponse(reply, status_code=status, headers=headers)


_LAX_BOOL = TypeAdapter(bool)


def _asks_eager(payload: bytes) -> str | None:
    """The field by which a start asks to be eager (``eager`` as the command would read
    it, pydantic's lax booleans included, or any ``first_step``), else None."""
    try:
        body = codec.loads(payload or b"{}")
    except ValueError:
        return None  # the command service says what is wrong with it
    if not isinstance(body, dict):
        return None
    if "first_step" in body:
        return "first_step"
    try:
        return "eager" if _LAX_BOOL.validate_python(body.get("eager", False)) else None
    except ValidationError:
        return None  # the command service refuses it as such
