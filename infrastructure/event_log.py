"""Read the event store's notification log as EventRecords (for the relay and backfills)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.persistence import Notification
from eventsourcing.utils import resolve_topic

from infrastructure.codec import may_hold_big_ints
from projections.records import TRACEPARENT_KEY, EventRecord, envelope_keys, record_of
from services.workflow_runs import WorkflowRuns


def read_after(app: WorkflowRuns, after: int, limit: int) -> list[EventRecord]:
    """Up to ``limit`` events with position > ``after``, in order.

    Positions can skip numbers: a transaction that rolled back consumed its ids. Because
    eventsourcing inserts under a table lock, ids commit in order, so a skipped id is never
    an insert still in flight: it is gone for good, and ``prev_position`` chains over it.
    """
    recorder = app.recorder
    rows: Sequence[tuple[int, UUID | str, int, str, bytes]]
    select_rows = getattr(recorder, "select_rows_after", None)
    if select_rows is not None:  # PostgreSQL: plain rows, no Notification objects
        rows = select_rows(after, limit)
    else:
        rows = [
            (n.id, n.originator_id, n.originator_version, n.topic, n.state)
            for n in recorder.select_notifications(
                start=after, limit=limit, inclusive_of_start=False
            )
        ]
    plain = app.mapper.cipher is None and app.mapper.compressor is None
    records: list[EventRecord] = []
    prev = after
    for position, originator_id, version, topic, state in rows:
        record = (
            plain_record_of(position, originator_id, version, topic, state, prev) if plain else None
        )
        if record is None:
            notification = Notification(
                id=position,
                originator_id=originator_id,
                originator_version=version,
                topic=topic,
                state=state,
            )
            record = record_of(app.mapper.to_domain_event(notification), position, prev)
        records.append(record)
        prev = position
    return records


def head(app: WorkflowRuns) -> int:
    """The position of the newest event in the store (0 when empty)."""
    return app.recorder.max_notification_id() or 0


# ------------------------------------------------------------------ the plain fast path
class _NotPlainError(Exception):
    """The stored state needs eventsourcing's own decoding (or an upcaster)."""


_KINDS: dict[str, tuple[str, str, int]] = {}
"""Topic -> (aggregate, type, class_version) of the event class it names."""


def _kind(topic: str) -> tuple[str, str, int]:
    found = _KINDS.get(topic)
    if found is None:
        cls = resolve_topic(topic)
        aggregate, _, kind = cls.__qualname__.rpartition(".")
        found = _KINDS[topic] = (aggregate, kind, getattr(cls, "class_version", 1))
    return found


def plain_record_of(
    position: int,
    originator_id: UUID | str,
    version: int,
    topic: str,
    stored: bytes,
    prev_position: int,
) -> EventRecord | None:
    """The EventRecord of a stored event (its columns) read straight from its JSON,
    without building the domain event: the same record as
    ``record_of(mapper.to_domain_event(...))``, or None when only that path can make it
    (an event stored at an older class version, which an upcaster must bring up to date,
    or anything eventsourcing's JSON alone can decode).

    eventsourcing's JSON transcoder stores a UUID as ``{"_type_": "uuid_hex", ...}`` and a
    datetime as ``{"_type_": "datetime_iso", ...}``; an EventRecord's data holds them as
    the strings ``jsonable`` makes of them, which is what this path makes too.
    """
    aggregate, kind, class_version = _kind(topic)
    if may_hold_big_ints(stored):
        return None  # orjson would read an integer beyond 64 bits as a float
    try:
        state = orjson.loads(stored)
        if type(state) is not dict or state.pop("class_version", 1) != class_version:
            return None
        stamp = state["timestamp"]
        if type(stamp) is not dict or stamp.get("_type_") != "datetime_iso":
            return None
        if stored.count(b'"_type_"') == 1:  # the timestamp's alone: nothing to convert
            data = {k: v for k, v in state.items() if k not in envelope_keys}
        else:
            data = {k: _plain(v) for k, v in state.items() if k not in envelope_keys}
        timestamp = datetime.fromisoformat(stamp["_data_"])
    except (_NotPlainError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return EventRecord(
        position=position,
        prev_position=prev_position,
        originator_id=originator_id if type(originator_id) is UUID else UUID(str(originator_id)),
        version=version,
        aggregate=aggregate,
        type=kind,
        timestamp=timestamp,
        data=data,
        traceparent=state.get(TRACEPARENT_KEY),
    )


def _plain(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        if "_type_" in value and len(value) == 2 and "_data_" in value:
            return _transcoded(value["_type_"], value["_data_"])
        return {k: _plain(v) for k, v in value.items()}
    if kind is list:
        return [_plain(v) for v in value]
    return value


def _transcoded(name: object, data: object) -> Any:
    if name == "uuid_hex" and type(data) is str:
        return str(UUID(data))
    if name == "datetime_iso" and type(data) is str:
        return datetime.fromisoformat(data).isoformat()
    raise _NotPlainError(name)
