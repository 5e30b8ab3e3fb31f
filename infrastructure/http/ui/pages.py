"""The web UI's pages: runs, a run's timeline and history, workflows, projections.

Everything goes through the ApiContext (read models, the store, the command gateway and
the optional rebuilder), so the UI works on any backend that supplies one.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode
from uuid import UUID

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from domain.values import JSON
from domain.workflow_run import ENDED, RunStatus
from infrastructure.http.context import ApiContext, api_context
from infrastructure.http.errors import UNAVAILABLE_ERRORS, ApiError, status_of
from infrastructure.http.history import run_history
from infrastructure.http.models import HistoryEvent
from infrastructure.http.ui.timeline import Timeline, build_timeline
from infrastructure.postgres.queries import InvalidQueryError, RunDetail, RunPage
from projections.runs import RunProjection

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"

PAGE_SIZE = 50
REFRESH_SECONDS = 2
"""How often the live parts of a page (runs, a run, projections) are fetched again."""
RUNS = (RunProjection.name,)
STATUSES = [s.value for s in RunStatus]
ENDED_STATUSES = frozenset(s.value for s in ENDED)

Context = Annotated[ApiContext, Depends(api_context)]


# ------------------------------------------------------------------------- rendering
def _when(value: datetime | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S.") + f"{value.microsecond // 1000:03d}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "running"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes:.0f} min {rest:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours:.0f} h {minutes:.0f} min"


def _json(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def _query(**params: object) -> str:
    """``?a=1&b=2`` of the parameters that have a value ("" when none has)."""
    given = {k: str(v) for k, v in params.items() if v not in (None, "")}
    return f"?{urlencode(given)}" if given else ""


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, duration=_duration, json=_json)
    env.globals.update(statuses=STATUSES, refresh=REFRESH_SECONDS, query=_query)
    return env


TEMPLATES = _environment()


def render(template: str, status: int = 200, **values: Any) -> HTMLResponse:
    return HTMLResponse(TEMPLATES.get_template(template).render(**values), status_code=status)


def error_page(status: int, title: str, message: str) -> HTMLResponse:
    return render("error.html", status, title=title, message=message, page=None)


class HtmlErrors(APIRoute):
    """The UI's routes answer errors with a page a person can read, not a JSON body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                return error_page(e.status, _title(e.status), e.message)
            except (RequestValidationError, InvalidQueryError) as e:
                return error_page(400, "Bad request", _invalid(e))
            except UNAVAILABLE_ERRORS:
                return error_page(
                    503, "Unavailable", "The database is unavailable right now; try again."
                )

        return guarded


def _title(status: int) -> str:
    return {404: "Not found", 409: "Conflict", 503: "Unavailable"}.get(status, "Error")


def _invalid(error: Exception) -> str:
    if isinstance(error, RequestValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in error.errors()
        )
    return str(error)


router = APIRouter(prefix="/ui", include_in_schema=False, route_class=HtmlErrors)


# ------------------------------------------------------------------------------ runs
@router.get("/")
async def home() -> RedirectResponse:
    return RedirectResponse("/ui/runs", status_code=303)


@router.get("/runs")
async def runs_page(
    ctx: Context, workflow: str | None = None, status: str | None = None, cursor: str | None = None
) -> HTMLResponse:
    filters = _filters(workflow, status, cursor)
    workflows, page = await asyncio.gather(
        asyncio.to_thread(ctx.queries.list_workflows), _runs(ctx, filters)
    )
    names = sorted({w.name for w in workflows} | ({workflow} if workflow else set()))
    return render("runs.html", page="runs", runs=page, filters=filters, workflows=names)


@router.get("/runs/rows")
async def runs_rows(
    ctx: Context, workflow: str | None = None, status: str | None = None, cursor: str | None = None
) -> HTMLResponse:
    """The runs table alone: what the runs page polls for."""
    filters = _filters(workflow, status, cursor)
    return render("_runs_table.html", runs=await _runs(ctx, filters), filters=filters)


def _filters(workflow: str | None, status: str | None, cursor: str | None) -> dict[str, str]:
    if status and status not in STATUSES:
        raise InvalidQueryError(f"unknown status {status!r}; one of {', '.join(STATUSES)}")
    given = {"workflow": workflow, "status": status, "cursor": cursor}
    return {k: v for k, v in given.items() if v}


async def _runs(ctx: ApiContext, filters: Mapping[str, str]) -> RunPage:
    return await asyncio.to_thread(ctx.queries.list_runs_page, limit=PAGE_SIZE, **filters)


# ------------------------------------------------------------------------- one run
@router.get("/runs/{run_id}")
async def run_page(ctx: Context, run_id: str, min_position: int | None = None) -> HTMLResponse:
    view = await _run_view(ctx, run_id, min_position)
    if view is None:
        return _run_not_found(run_id)
    return render("run.html", page="runs", command_id=str(uuid.uuid4()), refused=None, **view)


@router.get("/runs/{run_id}/live")
async def run_live(ctx: Context, run_id: str) -> HTMLResponse:
    """The run's status, timeline and history alone: what the run page polls for."""
    view = await _run_view(ctx, run_id, None)
    if view is None:
        return _run_not_found(run_id)
    return render("_run_live.html", command_id=str(uuid.uuid4()), **view)


@router.post("/runs/{run_id}/cancel")
async def cancel_run(ctx: Context, request: Request, run_id: str) -> Response:
    form = await request.form()
    body: dict[str, JSON] = {"run_id": run_id, "reason": _field(form, "reason") or None}
    return await _command(ctx, request, run_id, "cancel_run", body, _field(form, "command_id"))


@router.post("/runs/{run_id}/retry")
async def retry_run(ctx: Context, request: Request, run_id: str) -> Response:
    form = await request.form()
    body: dict[str, JSON] = {"run_id": run_id}
    return await _command(ctx, request, run_id, "retry_run", body, _field(form, "command_id"))


def _field(form: Mapping[str, Any], name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


async def _command(
    ctx: ApiContext,
    request: Request,
    run_id: str,
    name: str,
    body: dict[str, JSON],
    command_id: str,
) -> Response:
    """Send command ``name``; on success show the run as of the command's position, else
    the run page again with the refusal (an error changes nothing)."""
    _same_origin(request)
    if command_id:
        body["command_id"] = command_id  # a resubmitted form is answered, not applied again
    payload = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
    try:
        reply = await ctx.commands.send(name, payload)
    except ApiError as e:
        code, message = e.code, e.message
    else:
        if reply.get("ok") is True:
            where = f"/ui/runs/{run_id}{_query(min_position=reply.get('position'))}"
            return RedirectResponse(where, status_code=303)
        error = reply.get("error")
        error = error if isinstance(error, dict) else {}
        code = str(error.get("code") or "internal")
        message = str(error.get("message") or "the command was refused")
    view = await _run_view(ctx, run_id, None)
    refused = {"command": name, "code": code, "message": message}
    if view is None:
        return error_page(status_of(code), f"{name} was refused ({code})", message)
    return render(
        "run.html",
        status_of(code),
        page="runs",
        command_id=str(uuid.uuid4()),
        refused=refused,
        **view,
    )


def _same_origin(request: Request) -> None:
    """Refuse a form posted from another site: the UI's buttons change runs."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:  # every current browser says where a request comes from
        allowed = site in ("same-origin", "none")
    else:  # an older one: compare its Origin, if it gives one, with the Host it asked
        origin = request.headers.get("origin")
        allowed = origin is None or origin.split("://", 1)[-1] == request.headers.get("host")
    if not allowed:
        raise ApiError("unauthorized", "the UI's buttons work only from the UI's own pages")


async def _run_view(
    ctx: ApiContext, run_id: str, min_position: int | None
) -> dict[str, Any] | None:
    """What the run page shows; None when no run has this id."""
    try:
        uid = UUID(run_id)
    except ValueError:
        return None
    behind = None
    try:
        await ctx.fresh(RUNS, min_position)
    except ApiError as e:  # show what there is, and say it may be stale
        behind = e.message
    run, history = await asyncio.gather(
        asyncio.to_thread(ctx.queries.get_run, uid),
        asyncio.to_thread(run_history, ctx.store, uid),
    )
    if run is None and history is None:
        return None
    events: list[HistoryEvent] = history or []
    timeline = build_timeline(events, datetime.now(UTC))
    return {
        "run_id": str(uid),
        "run": run,
        "events": events,
        "timeline": timeline,
        "behind": behind,
        "active": _active(run, timeline),
        "can_cancel": run is not None and run.status not in ENDED_STATUSES,
        "can_retry": run is not None and run.status == RunStatus.FAILED.value,
    }


def _active(run: RunDetail | None, timeline: Timeline) -> bool:
    """Whether the page should keep refreshing itself."""
    if run is None:
        return True  # the read model has not caught up yet
    return run.status not in ENDED_STATUSES or timeline.finished_at is None


def _run_not_found(run_id: str) -> HTMLResponse:
    return error_page(404, "Run not found", f"There is no run with id {run_id!r}.")


# ------------------------------------------------------------------- workflows
@router.get("/workflows")
async def workflows_page(ctx: Context) -> HTMLResponse:
    workflows = await asyncio.to_thread(ctx.queries.list_workflows)
    return render("workflows.html", page="workflows", workflows=workflows)


@router.get("/workflows/rows")
async def workflows_rows(ctx: Context) -> HTMLResponse:
    """The workflows table alone: what the workflows page polls for."""
    workflows = await asyncio.to_thread(ctx.queries.list_workflows)
    return render("_workflows_table.html", workflows=workflows)


# ------------------------------------------------------------------ projections
@router.get("/projections")
async def projections_page(ctx: Context) -> HTMLResponse:
    return render("projections.html", page="projections", **await _projections(ctx))


@router.get("/projections/rows")
async def projections_rows(ctx: Context) -> HTMLResponse:
    """The projections table alone: what the projections page polls for."""
    return render("_projections_table.html", **await _projections(ctx))


@router.post("/projections/{name}/rebuild")
async def rebuild_projection(ctx: Context, request: Request, name: str) -> Response:
    _same_origin(request)
    if ctx.rebuilder is None:
        raise ApiError("not_found", "this server cannot rebuild projections")
    try:
        await ctx.rebuilder.rebuild(name)
    except ApiError as e:
        view = await _projections(ctx)
        view["refused"] = {"command": f"rebuild {name}", "code": e.code, "message": e.message}
        return render("projections.html", e.status, page="projections", **view)
    return RedirectResponse("/ui/projections", status_code=303)


async def _projections(ctx: ApiContext) -> dict[str, Any]:
    found = await asyncio.to_thread(ctx.queries.projections)
    outcomes = ctx.rebuilder.outcomes() if ctx.rebuilder is not None else {}
    return {
        "projections": found,
        "outcomes": outcomes,
        "can_rebuild": ctx.rebuilder is not None,
        "refused": None,
    }
