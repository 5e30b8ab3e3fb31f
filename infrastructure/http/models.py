"""Response models the API adds to the read models' own (history, projections, health, errors)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from domain.values import JSON


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class HistoryEvent(_Model):
    position: int
    """The event's global position in the store (its notification id)."""
    version: int
    """The run's version after this event (1 for the first)."""
    type: str
    timestamp: datetime
    data: dict[str, JSON]


class RunHistory(_Model):
    events: list[HistoryEvent]


class ProjectionInfo(_Model):
    name: str
    position: int
    head: int
    lag: int
    state: str


class RebuildInfo(_Model):
    ok: Literal[True] = True
    projection: str
    state: Literal["running", "done", "failed"]
    started_at: datetime
    finished_at: datetime | None = None
    error: str | None = None


class Health(_Model):
    ok: Literal[True] = True
    checks: dict[str, str]


class ErrorDetail(_Model):
    code: str
    message: str
    details: list[JSON]


class ErrorBody(_Model):
    """Every answer that is not 2xx: ``{"ok": false, "error": {...}}``."""

    ok: Literal[False] = False
    error: ErrorDetail
