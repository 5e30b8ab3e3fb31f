"""What the routes work with: the query side, the store, NATS, and read-your-writes waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from fastapi import Request
from nats.aio.client import Client

from infrastructure.http.freshness import PositionWatcher
from infrastructure.nats.names import Names
from infrastructure.postgres.queries import ReadModelQueries
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


@dataclass(frozen=True)
class ApiContext:
    settings: Settings
    limits: Limits
    queries: ReadModelQueries
    store: WorkflowRuns
    nats: Client
    names: Names
    watcher: PositionWatcher

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
