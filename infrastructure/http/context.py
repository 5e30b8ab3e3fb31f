"""What the routes work with: the query side, the store, NATS, and read-your-writes waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol
from uuid import UUID

from fastapi import Request

from domain.values import JSON
from infrastructure.http.freshness import PositionWatcher
from infrastructure.postgres.queries import (
    InboundEventDetail,
    RunDetail,
    RunPage,
    WorkflowSummary,
)
from infrastructure.postgres.read_models import ProjectionStatus
from infrastructure.settings import Settings
from services.workflow_runs import WorkflowRuns


@dataclass(frozen=True)
class Limits:
    """How long the API waits on its dependencies (create_app's keyword arguments)."""

    max_wait: float = 5.0
    """Seconds a read with ``min_position`` waits for the projections before a 503."""
    poll_interval: float = 0.025
    """Seconds between two reads of the projections' positions while someone waits."""
    command_timeout: float = 10.0
    """Seconds a forwarded command waits for the command service's reply."""
    health_timeout: float = 2.0
    """Seconds /healthz gives each dependency to answer."""
    db_timeout: float = 5.0
    """Seconds a query waits for a pooled connection before answering ``unavailable``."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, not {value!r}")


class Queries(Protocol):
    """The read side the API serves: PostgreSQL's views, or the embedded engine's memory."""

    def list_runs_page(self, **filters: Any) -> RunPage: ...

    def get_run(self, run_id: UUID) -> RunDetail | None: ...

    def list_workflows(self) -> list[WorkflowSummary]: ...

    def get_event(self, event_id: UUID) -> InboundEventDetail | None: ...

    def projection_positions(self) -> dict[str, int]: ...

    def projections(self) -> list[ProjectionStatus]: ...

    def close(self) -> None: ...


class CommandGateway(Protocol):
    """Where the API's commands go: the command service over NATS, or the embedded engine."""

    dependency: str
    """The name /healthz gives this dependency ("nats", "engine")."""

    async def send(self, name: str, payload: bytes) -> dict[str, JSON]:
        """The reply to command ``name`` (an error body when refused); raises ApiError when
        the request is malformed or nobody can answer."""
        ...

    async def check(self, timeout: float) -> None:
        """Return when the gateway can carry a command; raise when it cannot."""
        ...


@dataclass(frozen=True)
class RebuildOutcome:
    """How the last rebuild of a projection that a Rebuilder started went."""

    projection: str
    state: Literal["running", "done", "failed"]
    started_at: datetime
    finished_at: datetime | None = None
    error: str | None = None


class Rebuilder(Protocol):
    """Rebuilds a projection from the event store beside the live one (the UI's button)."""

    async def rebuild(self, projection: str) -> None:
        """Start rebuilding ``projection`` and return without waiting for it to finish;
        raise ApiError ``not_found`` for an unknown projection, ``conflict`` when this
        rebuilder is rebuilding it already."""
        ...

    def outcomes(self) -> Mapping[str, RebuildOutcome]:
        """The last rebuild started here of each projection, by projection name."""
        ...


@dataclass(frozen=True)
class ApiContext:
    settings: Settings
    limits: Limits
    queries: Queries
    store: WorkflowRuns
    commands: CommandGateway
    watcher: PositionWatcher
    rebuilder: Rebuilder | None = None
    """None where projections cannot be rebuilt from the API (the UI hides its button)."""

    async def fresh(self, projections: Iterable[str], min_position: int | None) -> None:
        """Wait until ``projections`` have applied ``min_position`` (read-your-writes)."""
        if min_position:
            await self.watcher.wait(projections, min_position, self.limits.max_wait)

    async def positions(self) -> dict[str, int]:
        return await asyncio.to_thread(self.queries.projection_positions)


def api_context(request: Request) -> ApiContext:
    """The dependency every route takes: what the lifespan opened."""
    context: ApiContext = request.app.state.ledgerflow
    return context
