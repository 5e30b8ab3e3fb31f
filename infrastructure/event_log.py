"""Read the event store's notification log as EventRecords (for the relay and backfills)."""

from __future__ import annotations

from projections.records import EventRecord, record_of
from services.workflow_runs import WorkflowRuns


def read_after(app: WorkflowRuns, after: int, limit: int) -> list[EventRecord]:
    """Up to ``limit`` events with position > ``after``, in order.

    Positions can skip numbers: a transaction that rolled back consumed its ids. Because
    eventsourcing inserts under a table lock, ids commit in order, so a skipped id is never
    an insert still in flight: it is gone for good, and ``prev_position`` chains over it.
    """
    notifications = app.recorder.select_notifications(
        start=after, limit=limit, inclusive_of_start=False
    )
    records: list[EventRecord] = []
    prev = after
    for notification in notifications:
        domain_event = app.mapper.to_domain_event(notification)
        records.append(record_of(domain_event, notification.id, prev))
        prev = notification.id
    return records


def head(app: WorkflowRuns) -> int:
    """The position of the newest event in the store (0 when empty)."""
    return app.recorder.max_notification_id() or 0
