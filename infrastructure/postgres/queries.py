"""Typed queries on the read models' stable views, for the HTTP API, the CLI and the UI."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any, Self
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict

from domain.values import JSON
from domain.workflow_run import RunStatus
from infrastructure.postgres.read_model_schema import SUMMARY_COLUMNS
from infrastructure.postgres.read_models import ProjectionStatus, open_pool, projection_status
from infrastructure.settings import Settings

MAX_LIMIT = 500


class InvalidQueryError(ValueError):
    """A malformed filter or cursor (the HTTP layer answers 400 ``invalid_command``)."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class RunSummary(_Model):
    run_id: UUID
    workflow: str
    key: str | None
    status: str
    error_type: str | None
    created_at: datetime
    updated_at: datetime
    parent_run_id: UUID | None


class StepDetail(_Model):
    name: str
    status: str
    attempts: int
    output: JSON = None
    error: dict[str, JSON] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    retry_due_at: datetime | None = None


class SleepDetail(_Model):
    name: str
    wake_at: datetime
    started_at: datetime
    fired_at: datetime | None = None


class WaitDetail(_Model):
    name: str
    event_name: str
    match: dict[str, JSON]
    timeout_at: datetime | None = None
    started_at: datetime
    outcome: str
    event_id: UUID | None = None
    data: JSON = None
    resolved_at: datetime | None = None


class ChildDetail(_Model):
    name: str
    run_id: UUID
    workflow: str
    started_at: datetime
    outcome: str
    output: JSON = None
    error: dict[str, JSON] | None = None
    finished_at: datetime | None = None


class SentEventDetail(_Model):
    name: str
    event_name: str
    event_id: UUID
    sent_at: datetime


class RunDetail(_Model):
    run_id: UUID
    workflow: str
    key: str | None
    status: str
    input: JSON = None
    output: JSON = None
    error: dict[str, JSON] | None = None
    created_at: datetime
    updated_at: datetime
    parent_run_id: UUID | None = None
    parent_step: str | None = None
    triggered_by: UUID | None = None
    cancel_requested: bool = False
    cancel_reason: str | None = None
    steps: list[StepDetail]
    sleeps: list[SleepDetail]
    waits: list[WaitDetail]
    children: list[ChildDetail]
    sent_events: list[SentEventDetail]
    version: int


class WorkflowSummary(_Model):
    name: str
    triggers: list[str]
    definition: dict[str, JSON]
    workers: list[str]
    runs: dict[str, int]
    """Runs by status; statuses with no run are left out."""
    registered_at: datetime
    updated_at: datetime


class TriggeredRun(_Model):
    workflow: str
    run_id: UUID
    at: datetime


class WokenRun(_Model):
    run_id: UUID
    wait: str
    at: datetime


class InboundEventDetail(_Model):
    event_id: UUID
    name: str
    data: JSON = None
    external_id: str | None
    sent_by_run: UUID | None
    received_at: datetime
    triggered: list[TriggeredRun]
    woken: list[WokenRun]


class RunPage(_Model):
    items: list[RunSummary]
    next_cursor: str | None


def encode_cursor(created_at: datetime, run_id: UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(run_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, run_id = json.loads(raw)
        when = datetime.fromisoformat(created_at)
        if when.tzinfo is None:
            raise ValueError("naive time")
        return when, UUID(run_id)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as e:
        raise InvalidQueryError(f"invalid cursor {cursor[:80]!r}") from e


def check_run_filters(
    status: str | None, created_after: datetime | None, created_before: datetime | None, limit: int
) -> None:
    """Refuse what no backend can answer: a limit out of range, an unknown status, a
    naive time."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidQueryError(f"limit must be 1..{MAX_LIMIT}")
    if status is not None and status not in {s.value for s in RunStatus}:
        raise InvalidQueryError(f"unknown status {status!r}")
    for when in (created_after, created_before):
        if when is not None and when.tzinfo is None:
            raise InvalidQueryError("times must carry a time zone")


class ReadModelQueries:
    """Queries on the stable views (``ledgerflow_run_summaries``...), which a rebuild's
    swap repoints atomically: a query sees either the old version or the new one."""

    def __init__(
        self, pool: ConnectionPool[psycopg.Connection[Any]], schema: str = "public"
    ) -> None:
        self._pool = pool
        self._schema = schema
        self._owns_pool = False

    @classmethod
    def connect(cls, settings: Settings, pool_size: int | None = None) -> Self:
        """Queries on their own pool (closed by :meth:`close`)."""
        queries = cls(open_pool(settings, pool_size or settings.db_pool_size), settings.db_schema)
        queries._owns_pool = True
        return queries

    def close(self) -> None:
        if self._owns_pool:
            self._pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _view(self, name: str) -> sql.Identifier:
        return sql.Identifier(self._schema, name)

    def list_runs(
        self,
        workflow: str | None = None,
        status: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[RunSummary], str | None]:
        """Runs newest first; ``next_cursor`` continues after the last item (None: no more).

        ``created_after`` is inclusive, ``created_before`` exclusive.
        """
        check_run_filters(status, created_after, created_before, limit)
        where: list[sql.Composable] = []
        params: list[Any] = []
        if workflow is not None:
            where.append(sql.SQL("workflow = %s"))
            params.append(workflow)
        if status is not None:
            where.append(sql.SQL("status = %s"))
            params.append(status)
        if created_after is not None:
            where.append(sql.SQL("created_at >= %s"))
            params.append(created_after)
        if created_before is not None:
            where.append(sql.SQL("created_at < %s"))
            params.append(created_before)
        if cursor is not None:
            where.append(sql.SQL("(created_at, run_id) < (%s, %s)"))
            params.extend(decode_cursor(cursor))
        query = sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(map(sql.Identifier, SUMMARY_COLUMNS)),
            self._view("ledgerflow_run_summaries"),
        )
        if where:
            query += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
        query += sql.SQL(" ORDER BY created_at DESC, run_id DESC LIMIT %s")
        params.append(limit + 1)
        rows = self._fetch(query, params)
        items = [RunSummary(**row) for row in rows[:limit]]
        more = len(rows) > limit
        next_cursor = encode_cursor(items[-1].created_at, items[-1].run_id) if more else None
        return items, next_cursor

    def list_runs_page(self, **filters: Any) -> RunPage:
        """:meth:`list_runs` as one model: ``{"items": [...], "next_cursor": ...}``."""
        items, next_cursor = self.list_runs(**filters)
        return RunPage(items=items, next_cursor=next_cursor)

    def get_run(self, run_id: UUID) -> RunDetail | None:
        rows = self._fetch(
            sql.SQL("SELECT * FROM {} WHERE run_id = %s").format(
                self._view("ledgerflow_run_details")
            ),
            [run_id],
        )
        return RunDetail(**rows[0]) if rows else None

    def list_workflows(self) -> list[WorkflowSummary]:
        query = sql.SQL(
            "SELECT w.name, w.triggers, w.definition, w.workers, w.registered_at, w.updated_at,"
            " COALESCE((SELECT jsonb_object_agg(c.status, c.count ORDER BY c.status)"
            "  FROM {} c WHERE c.workflow = w.name AND c.count > 0), '{{}}') AS runs"
            " FROM {} w ORDER BY w.name"
        ).format(self._view("ledgerflow_run_counts"), self._view("ledgerflow_workflows"))
        return [WorkflowSummary(**row) for row in self._fetch(query, [])]

    def get_event(self, event_id: UUID) -> InboundEventDetail | None:
        rows = self._fetch(
            sql.SQL(
                "SELECT event_id, name, data, external_id, sent_by_run, received_at,"
                " triggered, woken FROM {} WHERE event_id = %s"
            ).format(self._view("ledgerflow_inbound_events")),
            [event_id],
        )
        return InboundEventDetail(**rows[0]) if rows else None

    def projection_positions(self) -> dict[str, int]:
        """The position each live projection has reached (for read-your-writes)."""
        return {p.name: p.position for p in self.projections() if p.state == "live"}

    def projections(self) -> list[ProjectionStatus]:
        """Every projection's version, position, the store's head, lag and state."""
        with self._pool.connection() as conn:
            return projection_status(conn, self._schema)

    def _fetch(self, query: sql.Composed, params: list[Any]) -> list[dict[str, Any]]:
        with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            return cursor.execute(query, params).fetchall()
