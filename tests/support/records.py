"""Event records as the followers (projections, scheduler, relay) receive them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from projections.records import EventRecord


def record(kind: str, run_id: UUID, position: int = 1, **data: Any) -> EventRecord:
    """A ``WorkflowRun.<kind>`` event of ``run_id`` at ``position`` (stamped ``position``
    seconds into 2026)."""
    return EventRecord(
        position=position,
        prev_position=position - 1,
        originator_id=run_id,
        version=position,
        aggregate="WorkflowRun",
        type=kind,
        timestamp=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=position),
        data=dict(data),
    )
