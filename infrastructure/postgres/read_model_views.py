"""PostgreSQL views of the projections: rows cached per batch, written back in one go."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from domain.values import JSON
from infrastructure import codec
from infrastructure.postgres.read_model_schema import (
    INBOUND_EVENTS,
    RUN_COUNTS,
    RUNS,
    WORKFLOWS,
    Table,
    table,
)
from projections.inbound_events import InboundEventRow
from projections.runs import ChildRow, RunRow, SentEventRow, SleepRow, StepRow, WaitRow
from projections.workflows import WorkflowRow

R = TypeVar("R")

NUL = "\x00"
NUL_STANDIN = "\ufffd"
"""PostgreSQL text and jsonb cannot hold NUL characters: they are shown as U+FFFD."""


class PostgresView(Protocol):
    """A view bound to one transaction: :meth:`prefetch`, let handlers work, :meth:`flush`."""

    def prefetch(self, ids: Iterable[UUID]) -> None: ...

    def flush(self) -> None: ...


def dumps(value: JSON) -> bytes:
    data = codec.dumps(value)
    if b"\\u0000" in data:  # rare: only then pay for the walk
        data = codec.dumps(_without_nul(value))
    return data


def jsonb(value: JSON) -> Jsonb:
    return Jsonb(value, dumps=dumps)


def text(value: str | None) -> str | None:
    return value.replace(NUL, NUL_STANDIN) if value is not None and NUL in value else value


def _without_nul(value: JSON) -> JSON:
    if isinstance(value, str):
        return value.replace(NUL, NUL_STANDIN)
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


_STATEMENTS: dict[tuple[str, str, int], tuple[bytes, bytes]] = {}
"""Each table version's select and upsert, composed and rendered once: psycopg's
composition in Python cost more than the statements' own parameters (issue 6)."""


def _statements(
    conn: psycopg.Connection[Any], spec: Table, schema: str, version: int
) -> tuple[bytes, bytes]:
    found = _STATEMENTS.get((spec.base, schema, version))
    if found is not None:
        return found
    name = table(schema, spec.base, version)
    key = sql.Identifier(spec.primary_key[0])
    columns = [c for c, _ in spec.columns]
    select = sql.SQL("SELECT {} FROM {} WHERE {} = ANY(%s)").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), name, key
    )
    upsert = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}").format(
        name,
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        key,
        sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
            for c in columns
            if c != spec.primary_key[0]
        ),
    )
    found = (select.as_bytes(conn), upsert.as_bytes(conn))
    _STATEMENTS[(spec.base, schema, version)] = found
    return found


class _Rows(Generic[R]):
    """The rows one transaction has read or written, keyed by id; None: known missing."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        spec: Table,
        schema: str,
        version: int,
        to_row: Callable[[dict[str, Any]], R],
        to_params: Callable[[R], Sequence[Any]],
    ) -> None:
        self._conn = conn
        self._to_row = to_row
        self._to_params = to_params
        self._rows: dict[UUID, R | None] = {}
        self._dirty: dict[UUID, R] = {}
        self._key = spec.primary_key[0]
        self._select, self._upsert = _statements(conn, spec, schema, version)

    def prefetch(self, ids: Iterable[UUID]) -> None:
        missing = list({i for i in ids if i not in self._rows})
        if not missing:
            return
        with self._conn.cursor(row_factory=psycopg.rows.dict_row) as cursor:
            for found in cursor.execute(self._select, (missing,)):
                self._rows[found[self._key]] = self._to_row(found)
        for i in missing:
            self._rows.setdefault(i, None)

    def get(self, row_id: UUID) -> R | None:
        if row_id not in self._rows:
            self.prefetch([row_id])
        return self._rows[row_id]

    def put(self, row_id: UUID, row: R) -> None:
        self._rows[row_id] = row
        self._dirty[row_id] = row

    def flush(self) -> None:
        if self._dirty:
            with self._conn.cursor() as cursor:
                cursor.executemany(
                    self._upsert, [self._to_params(self._dirty[i]) for i in sorted(self._dirty)]
                )
            self._dirty.clear()


class PostgresRunView:
    """Runs and run counts of one version, for one transaction."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str, version: int) -> None:
        self._conn = conn
        self._runs = _Rows(conn, RUNS, schema, version, run_row, run_params)
        self._counts: dict[tuple[str, str], int] = {}
        self._upsert_count = sql.SQL(
            "INSERT INTO {0} (workflow, status, count) VALUES (%s, %s, %s) "
            "ON CONFLICT (workflow, status) DO UPDATE SET count = {0}.count + EXCLUDED.count"
        ).format(table(schema, RUN_COUNTS.base, version))

    def run(self, run_id: UUID) -> RunRow | None:
        return self._runs.get(run_id)

    def save_run(self, row: RunRow) -> None:
        self._runs.put(row.run_id, row)

    def count_run(self, workflow: str, status: str, delta: int) -> None:
        # Zero sums are written too, so which rows exist never depends on the batching.
        key = (workflow, status)
        self._counts[key] = self._counts.get(key, 0) + delta

    def prefetch(self, ids: Iterable[UUID]) -> None:
        self._runs.prefetch(ids)

    def flush(self) -> None:
        self._runs.flush()
        if self._counts:
            with self._conn.cursor() as cursor:
                cursor.executemany(
                    self._upsert_count,
                    [(w, s, n) for (w, s), n in sorted(self._counts.items())],
                )
            self._counts.clear()


class PostgresWorkflowView:
    def __init__(self, conn: psycopg.Connection[Any], schema: str, version: int) -> None:
        self._rows = _Rows(conn, WORKFLOWS, schema, version, workflow_row, workflow_params)

    def workflow(self, type_id: UUID) -> WorkflowRow | None:
        return self._rows.get(type_id)

    def save_workflow(self, row: WorkflowRow) -> None:
        self._rows.put(row.type_id, row)

    def prefetch(self, ids: Iterable[UUID]) -> None:
        self._rows.prefetch(ids)

    def flush(self) -> None:
        self._rows.flush()


class PostgresInboundEventView:
    def __init__(self, conn: psycopg.Connection[Any], schema: str, version: int) -> None:
        self._rows = _Rows(
            conn, INBOUND_EVENTS, schema, version, inbound_event_row, inbound_event_params
        )

    def inbound_event(self, event_id: UUID) -> InboundEventRow | None:
        return self._rows.get(event_id)

    def save_inbound_event(self, row: InboundEventRow) -> None:
        self._rows.put(row.event_id, row)

    def prefetch(self, ids: Iterable[UUID]) -> None:
        self._rows.prefetch(ids)

    def flush(self) -> None:
        self._rows.flush()


VIEWS: dict[str, Callable[[psycopg.Connection[Any], str, int], PostgresView]] = {
    "runs": PostgresRunView,
    "workflows": PostgresWorkflowView,
    "inbound_events": PostgresInboundEventView,
}


# ------------------------------------------------------------------ rows <-> table columns
def run_params(row: RunRow) -> Sequence[Any]:
    """In the column order of ``read_model_schema.RUNS``."""
    return (
        row.run_id,
        row.workflow,
        text(row.key),
        row.status,
        text(row.error_type),
        row.created_at,
        row.updated_at,
        row.parent_run_id,
        text(row.parent_step),
        row.triggered_by,
        jsonb(row.input),
        jsonb(row.output),
        jsonb(row.error),
        row.cancel_requested,
        text(row.cancel_reason),
        row.compensation,
        jsonb([s.to_json() for s in row.steps.values()]),
        jsonb([s.to_json() for s in row.sleeps.values()]),
        jsonb([w.to_json() for w in row.waits.values()]),
        jsonb([c.to_json() for c in row.children.values()]),
        jsonb([e.to_json() for e in row.sent_events.values()]),
        row.version,
    )


def run_row(found: dict[str, Any]) -> RunRow:
    return RunRow(
        run_id=found["run_id"],
        workflow=found["workflow"],
        key=found["key"],
        status=found["status"],
        input=found["input"],
        created_at=found["created_at"],
        updated_at=found["updated_at"],
        version=found["version"],
        parent_run_id=found["parent_run_id"],
        parent_step=found["parent_step"],
        triggered_by=found["triggered_by"],
        output=found["output"],
        error=found["error"],
        cancel_requested=found["cancel_requested"],
        cancel_reason=found["cancel_reason"],
        compensation=found["compensation"],
        steps={s["name"]: StepRow.from_json(s) for s in found["steps"]},
        sleeps={s["name"]: SleepRow.from_json(s) for s in found["sleeps"]},
        waits={w["name"]: WaitRow.from_json(w) for w in found["waits"]},
        children={c["name"]: ChildRow.from_json(c) for c in found["children"]},
        sent_events={e["name"]: SentEventRow.from_json(e) for e in found["sent_events"]},
    )


def workflow_params(row: WorkflowRow) -> Sequence[Any]:
    return (
        row.type_id,
        row.name,
        jsonb(row.triggers),
        jsonb(row.definition),
        jsonb(row.workers),
        row.registered_at,
        row.updated_at,
        row.version,
    )


def workflow_row(found: dict[str, Any]) -> WorkflowRow:
    return WorkflowRow(
        type_id=found["type_id"],
        name=found["name"],
        definition=found["definition"],
        registered_at=found["registered_at"],
        updated_at=found["updated_at"],
        version=found["version"],
        workers=list(found["workers"]),
    )


def inbound_event_params(row: InboundEventRow) -> Sequence[Any]:
    return (
        row.event_id,
        row.name,
        jsonb(row.data),
        text(row.external_id),
        row.sent_by_run,
        row.received_at,
        row.updated_at,
        jsonb(row.triggered),
        jsonb(row.woken),
        row.version,
    )


def inbound_event_row(found: dict[str, Any]) -> InboundEventRow:
    return InboundEventRow(
        event_id=found["event_id"],
        name=found["name"],
        data=found["data"],
        external_id=found["external_id"],
        sent_by_run=found["sent_by_run"],
        received_at=found["received_at"],
        updated_at=found["updated_at"],
        version=found["version"],
        triggered=list(found["triggered"]),
        woken=list(found["woken"]),
    )
