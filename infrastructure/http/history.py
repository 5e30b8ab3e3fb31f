"""A run's history straight from the event store, each event at its global position."""

from __future__ import annotations

from uuid import UUID

from eventsourcing.persistence import Notification
from eventsourcing.postgres import PostgresApplicationRecorder
from psycopg import sql

from infrastructure.http.models import HistoryEvent
from projections.records import record_of
from services.workflow_runs import WorkflowRuns

RUN_AGGREGATE = "WorkflowRun"

SCAN_BATCH = 1_000
"""Notifications read per round when scanning a store that cannot select by aggregate."""


def run_history(store: WorkflowRuns, run_id: UUID) -> list[HistoryEvent] | None:
    """Every event of run ``run_id`` in order; None when no run has this id.

    Read-only, and decoded by the application's own mapper, so upcasting (and any cipher or
    compression the store is configured with) applies as it does for the aggregate.
    """
    records = [
        record_of(store.mapper.to_domain_event(n), n.id, 0) for n in _notifications(store, run_id)
    ]
    if not records or records[0].aggregate != RUN_AGGREGATE:
        return None  # nothing, or another aggregate's id (an inbound event, a workflow type)
    return [
        HistoryEvent(
            position=r.position, version=r.version, type=r.type, timestamp=r.timestamp, data=r.data
        )
        for r in records
    ]


def _notifications(store: WorkflowRuns, originator_id: UUID) -> list[Notification]:
    recorder = store.recorder
    if not isinstance(recorder, PostgresApplicationRecorder):
        return _scan(store, originator_id)
    # select_events() gives no notification ids, so ask for them by the primary key's
    # leading column: one index range scan however long the log.
    query = sql.SQL(
        "SELECT notification_id, originator_id, originator_version, topic, state"
        " FROM {} WHERE originator_id = %s ORDER BY originator_version"
    ).format(sql.Identifier(recorder.datastore.schema, recorder.events_table_name))
    with recorder.datastore.transaction(commit=False) as cursor:
        rows = cursor.execute(query, (originator_id,)).fetchall()
    return [
        Notification(
            id=row["notification_id"],
            originator_id=row["originator_id"],
            originator_version=row["originator_version"],
            topic=row["topic"],
            state=bytes(row["state"]),
        )
        for row in rows
    ]


def _scan(store: WorkflowRuns, originator_id: UUID) -> list[Notification]:
    """The in-memory store (``memory://``) has no index to ask: read the whole log."""
    found: list[Notification] = []
    after = 0
    while batch := store.recorder.select_notifications(
        start=after, limit=SCAN_BATCH, inclusive_of_start=False
    ):
        found.extend(n for n in batch if n.originator_id == originator_id)
        after = batch[-1].id
    return found
