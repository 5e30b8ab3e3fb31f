"""Inbound events read model: each event sent in, and the runs it started or woke."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol
from uuid import UUID

from domain.values import JSON
from projections.projection import Projection, handles
from projections.records import EventRecord


class UnknownInboundEventError(RuntimeError):
    """A record names an inbound event whose receipt was never projected."""


@dataclass
class InboundEventRow:
    event_id: UUID
    name: str
    data: JSON
    external_id: str | None
    sent_by_run: UUID | None
    received_at: datetime
    updated_at: datetime
    version: int
    triggered: list[dict[str, JSON]] = field(default_factory=list)  # {workflow, run_id, at}
    woken: list[dict[str, JSON]] = field(default_factory=list)  # {run_id, wait, at}


class InboundEventView(Protocol):
    """The rows the inbound-events projection reads and writes."""

    def inbound_event(self, event_id: UUID) -> InboundEventRow | None:
        """The event's row, or None if it has none yet."""

    def save_inbound_event(self, row: InboundEventRow) -> None:
        """Insert or replace the event's row."""


class InboundEventProjection(Projection[InboundEventView]):
    """An event's receipt, then each run the event router started or woke with it."""

    name = "inbound_events"

    @handles("InboundEvent.Received")
    def _received(self, record: EventRecord) -> None:
        data = record.data
        sent_by = data.get("sent_by_run")
        row = InboundEventRow(
            event_id=record.originator_id,
            name=data["name"],
            data=data["data"],
            external_id=data.get("external_id"),
            sent_by_run=UUID(str(sent_by)) if sent_by is not None else None,
            received_at=record.timestamp,
            updated_at=record.timestamp,
            version=record.version,
        )
        self.view.save_inbound_event(row)

    @handles("InboundEvent.RunTriggered")
    def _run_triggered(self, record: EventRecord) -> None:
        row = self._row(record)
        row.triggered.append(
            {
                "workflow": record.data["workflow"],
                "run_id": record.data["run_id"],
                "at": record.timestamp.isoformat(),
            }
        )
        self._save(row, record)

    @handles("InboundEvent.RunWoken")
    def _run_woken(self, record: EventRecord) -> None:
        row = self._row(record)
        row.woken.append(
            {
                "run_id": record.data["run_id"],
                "wait": record.data["wait"],
                "at": record.timestamp.isoformat(),
            }
        )
        self._save(row, record)

    def _row(self, record: EventRecord) -> InboundEventRow:
        row = self.view.inbound_event(record.originator_id)
        if row is None:
            raise UnknownInboundEventError(
                f"{record.qualified_type} at {record.position} names inbound event "
                f"{record.originator_id}, whose receipt was never projected"
            )
        return row

    def _save(self, row: InboundEventRow, record: EventRecord) -> None:
        row.updated_at = record.timestamp
        row.version = record.version
        self.view.save_inbound_event(row)
