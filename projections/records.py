"""EventRecord: one stored event as plain JSON, the same from JetStream and from the store."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any
from uuid import UUID

from domain.values import JSON

TRACEPARENT_KEY = "_traceparent"
"""Where a stored event keeps the trace context of the command that appended it, if any.

Metadata, not a field of the event: eventsourcing gives extra stored keys to the event
object as attributes, and its mutators ignore them, so old and new events load alike.
"""
envelope_keys = frozenset(
    {"originator_id", "originator_version", "timestamp", "originator_topic", TRACEPARENT_KEY}
)


@dataclass(frozen=True)
class EventRecord:
    """A domain event at its global ``position`` in the log, with JSON-only ``data``.

    ``prev_position`` is the position of the event published just before it (0 for the
    first); a consumer whose last position differs has a gap to backfill from the store.
    """

    position: int
    prev_position: int
    originator_id: UUID
    version: int
    aggregate: str  # "WorkflowRun", "InboundEvent", "WorkflowType"
    type: str  # "StepCompleted", ...
    timestamp: datetime
    data: dict[str, JSON]
    traceparent: str | None = field(default=None, compare=False)
    """The W3C trace context of the command that appended the event (not on the wire)."""

    @property
    def qualified_type(self) -> str:
        return f"{self.aggregate}.{self.type}"

    def to_json(self) -> dict[str, JSON]:
        """The JSON body published on JetStream (headers carry the positions too)."""
        return {
            "position": self.position,
            "prev_position": self.prev_position,
            "originator_id": str(self.originator_id),
            "version": self.version,
            "aggregate": self.aggregate,
            "type": self.type,
            "timestamp": self.timestamp.isoformat(),
            "data": self.data,
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> EventRecord:
        return cls(
            position=int(body["position"]),
            prev_position=int(body["prev_position"]),
            originator_id=UUID(str(body["originator_id"])),
            version=int(body["version"]),
            aggregate=str(body["aggregate"]),
            type=str(body["type"]),
            timestamp=datetime.fromisoformat(str(body["timestamp"])),
            data=dict(body["data"]),
        )


def record_of(domain_event: object, position: int, prev_position: int) -> EventRecord:
    """The EventRecord of an eventsourcing domain event (e.g. ``WorkflowRun.StepCompleted``)."""
    aggregate, _, kind = type(domain_event).__qualname__.rpartition(".")
    state = vars(domain_event)
    return EventRecord(
        position=position,
        prev_position=prev_position,
        originator_id=state["originator_id"],
        version=state["originator_version"],
        aggregate=aggregate,
        type=kind,
        timestamp=state["timestamp"],
        data={k: jsonable(v) for k, v in state.items() if k not in envelope_keys},
        traceparent=state.get(TRACEPARENT_KEY),
    )


_PLAIN = frozenset({str, int, float, bool, type(None)})


def jsonable(value: Any) -> JSON:
    """UUIDs and datetimes as strings, tuples and sets as lists: plain JSON, recursively."""
    kind = type(value)
    if kind in _PLAIN:  # by far the most common: tested first, and by type alone
        return value
    if kind is dict:
        return {k if type(k) is str else str(k): jsonable(v) for k, v in value.items()}
    if kind is list:
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((jsonable(v) for v in value), key=repr)
    raise TypeError(f"{type(value).__name__} is not JSON")
