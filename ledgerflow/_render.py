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


def status(value: str | None) -> Text:
    """A status in its colour."""
    text = value or "-"
    return Text(text, style=STATUS_STYLES.get(text, ""))


def when(timestamp: str | None, *, seconds: bool = False) -> str:
    """An ISO timestamp as ``2026-11-24 16:31:46.095`` (in the zone the API gives)."""
    if not timestamp:
        return "-"
    day, _, time = timestamp.partition("T")
    clock = time[: 8 if seconds else 12].rstrip("Z+")
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
    """A page of ``GET /runs``, and how to get the next one."""
    items: list[dict[str, Any]] = page.get("items", [])
    if not items:
        return Text("no runs", style="dim")
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("run id", no_wrap=True)  # whole, to be copied
    table.add_column("workflow")
    table.add_column("key")
    table.add_column("status", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("updated", no_wrap=True)
    table.add_column("error")
    for run in items:
        table.add_row(
            run["run_id"],
            escape(run["workflow"]),
            escape(run.get("key") or ""),
            status(run["status"]),
            when(run.get("created_at"), seconds=True),
            when(run.get("updated_at"), seconds=True),
            escape(run.get("error_type") or ""),
        )
    cursor = page.get("next_cursor")
    if not cursor:
        return table
    more = Text(f"more: ledgerflow runs list --cursor {cursor}", style="dim")
    return Group(table, more)


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
    table = Table("position", "version", "event", "time", "data")
    for event in history.get("events", []):
        table.add_row(
            str(event["position"]),
            str(event["version"]),
            escape(event["type"]),
            when(event.get("timestamp")),
            escape(compact(event.get("data"))),
        )
    return table


def _steps(run: dict[str, Any]) -> Table | None:
    steps: list[dict[str, Any]] = run.get("steps", [])
    if not steps:
        return None
    table = Table("step", "status", "attempts", "started", "finished", "output / error")
    table.title, table.title_justify = "steps", "left"
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
    table = Table("sleep", "wakes at", "fired at")
    table.title, table.title_justify = "sleeps", "left"
    for sleep in sleeps:
        table.add_row(escape(sleep["name"]), when(sleep["wake_at"]), when(sleep.get("fired_at")))
    return table


def _waits(run: dict[str, Any]) -> Table | None:
    waits: list[dict[str, Any]] = run.get("waits", [])
    if not waits:
        return None
    table = Table("wait", "event", "match", "outcome", "times out", "event id")
    table.title, table.title_justify = "waits", "left"
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
    table = Table("child", "workflow", "run id", "outcome", "output / error")
    table.title, table.title_justify = "children", "left"
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
    table = Table("sent", "event", "event id", "at")
    table.title, table.title_justify = "sent events", "left"
    for event in sent:
        table.add_row(
            escape(event["name"]),
            escape(event["event_name"]),
            str(event["event_id"]),
            when(event.get("sent_at")),
        )
    return table
