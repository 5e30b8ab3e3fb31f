"""The read-model queries of ``ledgerflow dev``: the same answers, from in-memory views."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from uuid import UUID

from infrastructure.embedded.engine import Engine
from infrastructure.postgres.queries import (
    InboundEventDetail,
    RunDetail,
    RunPage,
    RunSummary,
    WorkflowSummary,
    check_run_filters,
    decode_cursor,
    encode_cursor,
)
from infrastructure.postgres.read_models import ProjectionStatus
from projections.catalog import PROJECTIONS
from projections.runs import RunRow


class MemoryQueries:
    """:class:`~infrastructure.postgres.queries.ReadModelQueries`' methods over the
    engine's in-memory read models (the engine swaps them on a rebuild: always look them
    up through the engine)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def list_runs(
        self,
        workflow: str | None = None,
        status: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[RunSummary], str | None]:
        check_run_filters(status, created_after, created_before, limit)
        after = decode_cursor(cursor) if cursor is not None else None
        tests: list[Callable[[RunRow], bool]] = []
        if workflow is not None:
            tests.append(lambda r: r.workflow == workflow)
        if status is not None:
            tests.append(lambda r: r.status == status)
        if created_after is not None:
            tests.append(lambda r: r.created_at >= created_after)
        if created_before is not None:
            tests.append(lambda r: r.created_at < created_before)
        if after is not None:
            tests.append(lambda r: (r.created_at, r.run_id) < after)
        rows = sorted(
            (
                r
                for r in list(self.engine.read_models.views.runs.values())
                if all(t(r) for t in tests)
            ),
            key=lambda r: (r.created_at, r.run_id),
            reverse=True,
        )
        items = [_summary(row) for row in rows[:limit]]
        more = len(rows) > limit
        next_cursor = encode_cursor(items[-1].created_at, items[-1].run_id) if more else None
        return items, next_cursor

    def list_runs_page(self, **filters: Any) -> RunPage:
        items, next_cursor = self.list_runs(**filters)
        return RunPage(items=items, next_cursor=next_cursor)

    def get_run(self, run_id: UUID) -> RunDetail | None:
        row = self.engine.read_models.views.run(run_id)
        if row is None:
            return None
        return RunDetail.model_validate(
            {
                **_summary_fields(row),
                "input": row.input,
                "output": row.output,
                "error": row.error,
                "parent_step": row.parent_step,
                "triggered_by": row.triggered_by,
                "cancel_requested": row.cancel_requested,
                "cancel_reason": row.cancel_reason,
                "steps": [s.to_json() for s in row.steps.values()],
                "sleeps": [s.to_json() for s in row.sleeps.values()],
                "waits": [w.to_json() for w in row.waits.values()],
                "children": [c.to_json() for c in row.children.values()],
                "sent_events": [e.to_json() for e in row.sent_events.values()],
                "version": row.version,
            }
        )

    def list_workflows(self) -> list[WorkflowSummary]:
        views = self.engine.read_models.views
        summaries = []
        for row in sorted(views.workflows.values(), key=lambda w: w.name):
            counts = {
                status: count
                for (workflow, status), count in sorted(views.run_counts.items())
                if workflow == row.name and count > 0
            }
            summaries.append(
                WorkflowSummary(
                    name=row.name,
                    triggers=row.triggers,
                    definition=row.definition,
                    workers=row.workers,
                    runs=counts,
                    registered_at=row.registered_at,
                    updated_at=row.updated_at,
                )
            )
        return summaries

    def get_event(self, event_id: UUID) -> InboundEventDetail | None:
        row = self.engine.read_models.views.inbound_event(event_id)
        if row is None:
            return None
        return InboundEventDetail.model_validate(
            {
                "event_id": row.event_id,
                "name": row.name,
                "data": row.data,
                "external_id": row.external_id,
                "sent_by_run": row.sent_by_run,
                "received_at": row.received_at,
                "triggered": row.triggered,
                "woken": row.woken,
            }
        )

    def projection_positions(self) -> dict[str, int]:
        return dict(self.engine.read_models.positions)

    def projections(self) -> list[ProjectionStatus]:
        head = self.engine.position
        return [
            ProjectionStatus(
                name, self.engine.generation, position, head, max(head - position, 0), "live"
            )
            for name, position in self.engine.read_models.positions.items()
            if name in PROJECTIONS
        ]

    def close(self) -> None:
        """Nothing to close: the engine owns the views."""


def _summary_fields(row: RunRow) -> dict[str, Any]:
    return {
        "run_id": row.run_id,
        "workflow": row.workflow,
        "key": row.key,
        "status": row.status,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "parent_run_id": row.parent_run_id,
    }


def _summary(row: RunRow) -> RunSummary:
    return RunSummary(**_summary_fields(row), error_type=row.error_type)
