"""In-memory views and tracking: the read models without a database (tests, `dev`)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from projections.catalog import PROJECTIONS
from projections.inbound_events import InboundEventRow
from projections.projection import Backfill, Projection, in_order
from projections.records import EventRecord
from projections.runs import RunRow
from projections.workflows import WorkflowRow


@dataclass
class InMemoryViews:
    """Rows are copied in and out, as a database would: a change nobody saves is lost."""

    runs: dict[UUID, RunRow] = field(default_factory=dict)
    run_counts: dict[tuple[str, str], int] = field(default_factory=dict)
    workflows: dict[UUID, WorkflowRow] = field(default_factory=dict)
    inbound_events: dict[UUID, InboundEventRow] = field(default_factory=dict)

    def run(self, run_id: UUID) -> RunRow | None:
        return copy.deepcopy(self.runs.get(run_id))

    def save_run(self, row: RunRow) -> None:
        self.runs[row.run_id] = copy.deepcopy(row)

    def count_run(self, workflow: str, status: str, delta: int) -> None:
        key = (workflow, status)
        self.run_counts[key] = self.run_counts.get(key, 0) + delta

    def workflow(self, type_id: UUID) -> WorkflowRow | None:
        return copy.deepcopy(self.workflows.get(type_id))

    def save_workflow(self, row: WorkflowRow) -> None:
        self.workflows[row.type_id] = copy.deepcopy(row)

    def inbound_event(self, event_id: UUID) -> InboundEventRow | None:
        return copy.deepcopy(self.inbound_events.get(event_id))

    def save_inbound_event(self, row: InboundEventRow) -> None:
        self.inbound_events[row.event_id] = copy.deepcopy(row)


class InMemoryReadModels:
    """Every projection over one set of in-memory views, each with its tracked position."""

    def __init__(self) -> None:
        self.views = InMemoryViews()
        self.positions = dict.fromkeys(PROJECTIONS, 0)
        self._projections: dict[str, Projection[Any]] = {
            name: kind(self.views) for name, kind in PROJECTIONS.items()
        }

    def apply(self, name: str, batch: Iterable[EventRecord], backfill: Backfill) -> int:
        """Apply a delivered batch to projection ``name`` exactly once; how many applied."""
        records = in_order(batch, self.positions[name], backfill)
        projection = self._projections[name]
        for record in records:
            projection.process(record)
        if records:
            self.positions[name] = records[-1].position
        return len(records)

    def apply_all(self, batch: Iterable[EventRecord], backfill: Backfill) -> None:
        records = list(batch)
        for name in self._projections:
            self.apply(name, records, backfill)
