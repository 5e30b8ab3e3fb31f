"""Run-level counters and each run's own span, from the events the runs projection applied."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from infrastructure import metrics
from infrastructure.telemetry import tracing
from ledgerflow._telemetry import TRACING
from projections.records import EventRecord

STARTED = "WorkflowRun.RunStarted"
RETRIED = "WorkflowRun.RunRetried"
ENDINGS = {
    "WorkflowRun.RunCompleted": "completed",
    "WorkflowRun.RunFailed": "failed",
    "WorkflowRun.RunCancelled": "cancelled",
    "WorkflowRun.RunTimedOut": "timed_out",
}
UNKNOWN = "unknown"
"""The workflow label of a run the read model does not know (it cannot happen once the
runs projection has applied the run's start, which comes first)."""

Known = tuple[str, datetime]
"""A run's workflow and when it started."""
Lookup = Callable[[Collection[UUID]], dict[UUID, Known]]


class RunCounter:
    """Counts runs started, ended and retried by workflow, from committed records.

    Call :meth:`observe` with the records one transaction of the live runs projection has
    just applied: the tracking position makes that exactly once per event, whichever
    projections instance applied it. Run end events do not name the workflow: it is
    remembered from the start, else read from the run's read-model row.
    """

    def __init__(self, lookup: Lookup, remember: int = 10_000) -> None:
        self.lookup = lookup
        self.remember = remember
        self._known: OrderedDict[UUID, Known] = OrderedDict()

    def observe(self, records: Sequence[EventRecord]) -> None:
        for record in records:
            if record.qualified_type == STARTED:
                self._keep(record.originator_id, (str(record.data["workflow"]), record.timestamp))
        wanted = {
            r.originator_id
            for r in records
            if (r.qualified_type in ENDINGS or r.qualified_type == RETRIED)
            and r.originator_id not in self._known
        }
        if wanted:
            for run_id, known in self.lookup(wanted).items():
                self._keep(run_id, known)
        for record in records:
            kind = record.qualified_type
            if kind == STARTED:
                metrics.RUNS_STARTED.labels(str(record.data["workflow"])).inc()
            elif kind in ENDINGS:
                self._ended(record, ENDINGS[kind])
            elif kind == RETRIED:
                workflow, _ = self._known.get(record.originator_id, (UNKNOWN, record.timestamp))
                metrics.RUNS_RETRIED.labels(workflow).inc()

    def _ended(self, record: EventRecord, status: str) -> None:
        workflow, started_at = self._known.get(record.originator_id, (UNKNOWN, record.timestamp))
        metrics.RUNS_ENDED.labels(workflow, status).inc()
        if TRACING.enabled:
            tracing.run_ended(
                record.originator_id,
                workflow,
                status,
                started_at,
                record.timestamp,
                record.position,
            )

    def _keep(self, run_id: UUID, known: Known) -> None:
        self._known[run_id] = known
        self._known.move_to_end(run_id)
        while len(self._known) > self.remember:
            self._known.popitem(last=False)


def read_model_lookup(pool: ConnectionPool[psycopg.Connection[Any]], schema: str) -> Lookup:
    """Workflow and start of runs, from the runs read model's stable view."""
    query = sql.SQL("SELECT run_id, workflow, created_at FROM {} WHERE run_id = ANY(%s)").format(
        sql.Identifier(schema, "ledgerflow_run_summaries")
    )

    def lookup(run_ids: Collection[UUID]) -> dict[UUID, Known]:
        with pool.connection() as conn:
            rows = conn.execute(query, (list(run_ids),)).fetchall()
        return {row[0]: (row[1], row[2]) for row in rows}

    return lookup
