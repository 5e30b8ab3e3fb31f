"""Workflows read model: each registered workflow with its definition and its workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol
from uuid import UUID

from domain.values import JSON
from projections.projection import Projection, handles, stored_name
from projections.records import EventRecord


class UnknownWorkflowTypeError(RuntimeError):
    """A record names a workflow type whose registration was never projected."""


@dataclass
class WorkflowRow:
    type_id: UUID
    name: str
    definition: dict[str, JSON]
    registered_at: datetime
    updated_at: datetime
    version: int
    workers: list[str] = field(default_factory=list)  # sorted: a set, stored as a list

    @property
    def triggers(self) -> list[str]:
        return list(self.definition.get("triggers") or [])


class WorkflowView(Protocol):
    """The rows the workflows projection reads and writes."""

    def workflow(self, type_id: UUID) -> WorkflowRow | None:
        """The workflow type's row, or None if it has none yet."""

    def save_workflow(self, row: WorkflowRow) -> None:
        """Insert or replace the workflow type's row."""


class WorkflowProjection(Projection[WorkflowView]):
    """Registrations, definition changes, and the workers that join and leave."""

    name = "workflows"

    @handles("WorkflowType.Registered")
    def _registered(self, record: EventRecord) -> None:
        row = WorkflowRow(
            type_id=record.originator_id,
            name=record.data["name"],
            definition=record.data["definition"],
            registered_at=record.timestamp,
            updated_at=record.timestamp,
            version=record.version,
        )
        self.view.save_workflow(row)

    @handles("WorkflowType.DefinitionChanged")
    def _definition_changed(self, record: EventRecord) -> None:
        row = self._row(record)
        row.definition = record.data["definition"]
        self._save(row, record)

    @handles("WorkflowType.WorkerJoined")
    def _worker_joined(self, record: EventRecord) -> None:
        row = self._row(record)
        row.workers = sorted({*row.workers, stored_name(record.data["worker_id"])})
        self._save(row, record)

    @handles("WorkflowType.WorkerLeft")
    def _worker_left(self, record: EventRecord) -> None:
        row = self._row(record)
        row.workers = [w for w in row.workers if w != stored_name(record.data["worker_id"])]
        self._save(row, record)

    def _row(self, record: EventRecord) -> WorkflowRow:
        row = self.view.workflow(record.originator_id)
        if row is None:
            raise UnknownWorkflowTypeError(
                f"{record.qualified_type} at {record.position} names workflow type "
                f"{record.originator_id}, whose registration was never projected"
            )
        return row

    def _save(self, row: WorkflowRow, record: EventRecord) -> None:
        row.updated_at = record.timestamp
        row.version = record.version
        self.view.save_workflow(row)
