"""How the CLI shows runs to people: Rich tables, statuses in colour (``-o json`` skips this)."""

from __future__ import annotations

import json
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

STATUS_STYLES = {
    "queued": "bright_black",
    "running": "cyan",
    "sleeping": "blue",
    "waiting": "yellow",
    "compensating": "magenta",
    "completed": "green",
    "failed": "bold red",
    "cancelled": "red",
    # steps and waits
    "pending": "bright_black",
    "retrying": "yellow",
    "compensated": "magenta",
    "received": "green",
    "timed_out": "red",
}

CELL_CHARACTERS = 80
"""Longer JSON values are cut in tables; ``-o json`` has them whole."""


def _table(*headers: str, title: str | None = None) -> Table:
    """The CLI's tables: a rule under the header, no frame, one space between columns."""
    found = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0), title=title)
    found.title_justify, found.title_style = "left", "bold"
    for header in headers:
        found.add_column(header)
    return found


def status(value: str | None) -> Text:
    """A status in its colour."""
    text = value or "-"
    return Text(text, style=STATUS_STYLES.get(text, ""))


def when(timestamp: str | None, *, minutes: bool = False) -> str:
    """An ISO timestamp as ``2026-11-24 16:31:46.095`` (in the zone the API gives)."""
    if not timestamp:
        return "-"
    day, _, time = timestamp.partition("T")
    clock = time[: 5 if minutes else 12].rstrip("Z+")
    return f"{day} {clock}" if time else timestamp


def compact(value: Any, limit: int = CELL_CHARACTERS) -> str:
    """A JSON value on one line, cut at ``limit`` characters."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def failure(error: dict[str, Any] | None) -> str:
    """An error as ``Type: message`` (a step's, a run's or a child's)."""
    if not error:
        return ""
    kind, message = error.get("type") or "error", error.get("message") or ""
    return f"{kind}: {message}" if message else str(kind)


def runs_table(page: dict[str, Any]) -> RenderableType:
    """A page of ``GET /runs``."""
    items: list[dict[str, Any]] = page.get("items", [])
    if not items:
        return Text("no runs", style="dim")
    # Fits 80 columns: ids stay whole (to be copied); a run's key and error type go on a
    # second line under its workflow and its status.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    table.add_column("run id", no_wrap=True, min_width=36)
    table.add_column(_two("workflow", "key"), min_width=10, overflow="fold")
    table.add_column(_two("status", "error"), no_wrap=True, max_width=12)  # "compensating"
    table.add_column("created", no_wrap=True)
    for run in items:
        name = Text(run["workflow"])
        if run.get("key"):
            name.append("\n" + run["key"], style="dim")
        state = status(run["status"])
        if run.get("error_type"):
            state.append("\n" + run["error_type"], style="dim")
        table.add_row(run["run_id"], name, state, when(run.get("created_at"), minutes=True))
    return table


def _two(first: str, second: str) -> Text:
    """A header over cells that hold a second, dim line."""
    return Text.assemble((first, "bold"), "\n", (second, "dim"))


def run_detail(run: dict[str, Any]) -> RenderableType:
    """``GET /runs/{id}``: the run, then its steps, sleeps, waits, children and sent events."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("run", run["run_id"])
    head.add_row("workflow", escape(run["workflow"]))
    if run.get("key") is not None:
        head.add_row("key", escape(run["key"]))
    head.add_row("status", status(run["status"]))
    head.add_row("created", when(run.get("created_at")))
    head.add_row("updated", when(run.get("updated_at")))
    if run.get("parent_run_id"):
        head.add_row("parent", f"{run['parent_run_id']} (step {run.get('parent_step')})")
    if run.get("triggered_by"):
        head.add_row("triggered by", f"event {run['triggered_by']}")
    if run.get("cancel_requested"):
        head.add_row("cancel", escape(run.get("cancel_reason") or "requested"))
    head.add_row("input", escape(compact(run.get("input"), 200)))
    if run["status"] == "completed":
        head.add_row("output", escape(compact(run.get("output"), 200)))
    if run.get("error"):
        head.add_row("error", Text(failure(run["error"]), style="red"))
    parts: list[RenderableType] = [head]
    parts += [t for t in (_steps(run), _sleeps(run), _waits(run), _children(run)) if t]
    parts += [t for t in (_sent(run),) if t]
    return Group(*parts)


def history_table(history: dict[str, Any]) -> RenderableType:
    """``GET /runs/{id}/history``: every event of the run from the store."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    table.add_column("position", justify="right")
    table.add_column("version", justify="right")
    table.add_column("event", no_wrap=True)
    table.add_column("time")
    table.add_column("data", overflow="fold", ratio=1)
    for event in history.get("events", []):
        table.add_row(
            str(event["position"]),
            str(event["version"]),
            escape(event["type"]),
            when(event.get("timestamp")),
            escape(compact(event.get("data"), 400)),
        )
    return table


def _steps(run: dict[str, Any]) -> Table | None:
    steps: list[dict[str, Any]] = run.get("steps", [])
    if not steps:
        return None
    table = _table(
        "step", "status", "attempts", "started", "finished", "output / error", title="steps"
    )
    for step in steps:
        outcome = (
            Text(failure(step["error"]), style="red")
            if step.get("error")
            else Text(compact(step.get("output")) if step["status"] == "completed" else "")
        )
        table.add_row(
            escape(step["name"]),
            status(step["status"]),
            str(step.get("attempts", 0)),
            when(step.get("started_at")),
            when(step.get("finished_at")),
            outcome,
        )
    return table


def _sleeps(run: dict[str, Any]) -> Table | None:
    sleeps: list[dict[str, Any]] = run.get("sleeps", [])
    if not sleeps:
        return None
    table = _table("sleep", "wakes at", "fired at", title="sleeps")
    for sleep in sleeps:
        table.add_row(escape(sleep["name"]), when(sleep["wake_at"]), when(sleep.get("fired_at")))
    return table


def _waits(run: dict[str, Any]) -> Table | None:
    waits: list[dict[str, Any]] = run.get("waits", [])
    if not waits:
        return None
    table = _table("wait", "event", "match", "outcome", "times out", "event id", title="waits")
    for wait in waits:
        table.add_row(
            escape(wait["name"]),
            escape(wait["event_name"]),
            escape(compact(wait.get("match") or {})),
            status(wait["outcome"]),
            when(wait.get("timeout_at")),
            str(wait.get("event_id") or ""),
        )
    return table


def _children(run: dict[str, Any]) -> Table | None:
    children: list[dict[str, Any]] = run.get("children", [])
    if not children:
        return None
    table = _table("child", "workflow", "run id", "outcome", "output / error", title="children")
    for child in children:
        result = failure(child.get("error")) or compact(child.get("output"))
        table.add_row(
            escape(child["name"]),
            escape(child["workflow"]),
            str(child["run_id"]),
            status(child["outcome"]),
            escape(result),
        )
    return table


def _sent(run: dict[str, Any]) -> Table | None:
    sent: list[dict[str, Any]] = run.get("sent_events", [])
    if not sent:
        return None
    table = _table("sent", "event", "event id", "at", title="sent events")
    for event in sent:
        table.add_row(
            escape(event["name"]),
            escape(event["event_name"]),
            str(event["event_id"]),
            when(event.get("sent_at")),
        )
    return table
