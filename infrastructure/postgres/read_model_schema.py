"""Read-model tables (one set per projection version), stable views, and position tracking."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from infrastructure.postgres.schema import PostgresParams
from infrastructure.settings import Settings
from projections.catalog import PROJECTIONS

TRACKING_TABLE = "ledgerflow_projections"
LOCK_CLASS = 0x1EDF
"""First key of every advisory lock ledgerflow's read models take (the second is the name)."""

State = Literal["live", "building", "retired"]


@dataclass(frozen=True)
class Table:
    base: str
    columns: tuple[tuple[str, str], ...]
    primary_key: tuple[str, ...]
    indexes: tuple[tuple[str, ...], ...] = ()
    """Secondary indexes, built after a rebuild's bulk load (each a list of key expressions)."""


@dataclass(frozen=True)
class View:
    name: str
    table: str
    columns: tuple[str, ...] | None = None  # None: every column


@dataclass(frozen=True)
class ReadModelSchema:
    tables: tuple[Table, ...]
    views: tuple[View, ...]


NEWEST_FIRST = ("created_at DESC", "run_id DESC")

RUNS = Table(
    "runs",
    (
        ("run_id", "uuid NOT NULL"),
        ("workflow", "text NOT NULL"),
        ("key", "text"),
        ("status", "text NOT NULL"),
        ("error_type", "text"),
        ("created_at", "timestamptz NOT NULL"),
        ("updated_at", "timestamptz NOT NULL"),
        ("parent_run_id", "uuid"),
        ("parent_step", "text"),
        ("triggered_by", "uuid"),
        ("input", "jsonb"),
        ("output", "jsonb"),
        ("error", "jsonb"),
        ("cancel_requested", "boolean NOT NULL"),
        ("cancel_reason", "text"),
        ("compensation", "text"),
        ("steps", "jsonb NOT NULL"),
        ("sleeps", "jsonb NOT NULL"),
        ("waits", "jsonb NOT NULL"),
        ("children", "jsonb NOT NULL"),
        ("sent_events", "jsonb NOT NULL"),
        ("version", "integer NOT NULL"),
    ),
    ("run_id",),
    (NEWEST_FIRST, ("workflow", *NEWEST_FIRST), ("status", *NEWEST_FIRST)),
)
RUN_COUNTS = Table(
    "run_counts",
    (("workflow", "text NOT NULL"), ("status", "text NOT NULL"), ("count", "bigint NOT NULL")),
    ("workflow", "status"),
)
WORKFLOWS = Table(
    "workflows",
    (
        ("type_id", "uuid NOT NULL"),
        ("name", "text NOT NULL"),
        ("triggers", "jsonb NOT NULL"),
        ("definition", "jsonb NOT NULL"),
        ("workers", "jsonb NOT NULL"),
        ("registered_at", "timestamptz NOT NULL"),
        ("updated_at", "timestamptz NOT NULL"),
        ("version", "integer NOT NULL"),
    ),
    ("type_id",),
    (("name",),),
)
INBOUND_EVENTS = Table(
    "inbound_events",
    (
        ("event_id", "uuid NOT NULL"),
        ("name", "text NOT NULL"),
        ("data", "jsonb"),
        ("external_id", "text"),
        ("sent_by_run", "uuid"),
        ("received_at", "timestamptz NOT NULL"),
        ("updated_at", "timestamptz NOT NULL"),
        ("triggered", "jsonb NOT NULL"),
        ("woken", "jsonb NOT NULL"),
        ("version", "integer NOT NULL"),
    ),
    ("event_id",),
)

SUMMARY_COLUMNS = (
    "run_id",
    "workflow",
    "key",
    "status",
    "error_type",
    "created_at",
    "updated_at",
    "parent_run_id",
)

SCHEMAS: dict[str, ReadModelSchema] = {
    "runs": ReadModelSchema(
        (RUNS, RUN_COUNTS),
        (
            View("ledgerflow_run_summaries", "runs", SUMMARY_COLUMNS),
            View("ledgerflow_run_details", "runs"),
            View("ledgerflow_run_counts", "run_counts"),
        ),
    ),
    "workflows": ReadModelSchema((WORKFLOWS,), (View("ledgerflow_workflows", "workflows"),)),
    "inbound_events": ReadModelSchema(
        (INBOUND_EVENTS,), (View("ledgerflow_inbound_events", "inbound_events"),)
    ),
}
"""Projection name -> its versioned tables and the stable views readers query."""

assert set(SCHEMAS) == set(PROJECTIONS), "every projection needs tables"


@dataclass(frozen=True)
class Tracked:
    name: str
    version: int
    position: int
    state: State


def table_name(base: str, version: int) -> str:
    return f"ledgerflow_{base}_v{version}"


def table(schema: str, base: str, version: int) -> sql.Identifier:
    return sql.Identifier(schema, table_name(base, version))


def tracking_table(schema: str) -> sql.Identifier:
    return sql.Identifier(schema, TRACKING_TABLE)


def lock(conn: psycopg.Connection[Any], schema: str, name: str) -> None:
    """Serialise writers of projection ``name`` until the transaction ends.

    Every batch, catch-up and swap takes it first, so several runners (or a runner and a
    rebuild's swap) never interleave and always see the live version that was committed.
    """
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_CLASS, f"{schema}.{name}"))


def lock_many(conn: psycopg.Connection[Any], schema: str, names: Sequence[str]) -> None:
    """:func:`lock` for each of ``names``, in their order, in one round trip."""
    conn.execute(
        # A function scan returns the array's elements in order, so the locks follow it.
        "SELECT pg_advisory_xact_lock(%s, hashtext(n)) FROM unnest(%s::text[]) AS u(n)",
        (LOCK_CLASS, [f"{schema}.{name}" for name in names]),
    )


def init_read_models(settings: Settings) -> None:
    """Create the read models' tables if missing (``ledgerflow db init``; idempotent)."""
    conninfo = PostgresParams.from_url(settings.database_url).conninfo()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        create_tables(conn, schema=settings.db_schema)


def create_tables(
    target: psycopg.Connection[Any] | ConnectionPool[Any], version: int = 1, schema: str = "public"
) -> None:
    """Create the tracking table and, for each projection with no live version, version
    ``version`` of its tables and its stable views (at position 0). Idempotent."""
    if isinstance(target, ConnectionPool):
        with target.connection() as conn:
            _create_tables(conn, version, schema)
    else:
        _create_tables(target, version, schema)


def _create_tables(conn: psycopg.Connection[Any], version: int, schema: str) -> None:
    with conn.transaction():
        # Two `db init` at once would race on CREATE TABLE IF NOT EXISTS: take turns.
        lock(conn, schema, TRACKING_TABLE)
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " name text NOT NULL,"
                " version integer NOT NULL,"
                " position bigint NOT NULL DEFAULT 0,"
                " state text NOT NULL CHECK (state IN ('live', 'building', 'retired')),"
                " updated_at timestamptz NOT NULL DEFAULT now(),"
                " PRIMARY KEY (name, version))"
            ).format(tracking_table(schema))
        )
        conn.execute(
            sql.SQL(
                "CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} (name) WHERE state = 'live'"
            ).format(sql.Identifier(f"{TRACKING_TABLE}_one_live"), tracking_table(schema))
        )
        for name in PROJECTIONS:
            if live(conn, schema, name) is not None:
                continue
            create_version(conn, schema, name, version, indexes=True)
            insert_tracking(conn, schema, name, version, "live")
            point_views(conn, schema, name, version)


def create_version(
    conn: psycopg.Connection[Any], schema: str, name: str, version: int, *, indexes: bool
) -> None:
    """Create version ``version`` of projection ``name``'s tables (empty)."""
    for spec in SCHEMAS[name].tables:
        columns = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(column), sql.SQL(kind))
            for column, kind in spec.columns
        )
        key = sql.SQL(", ").join(map(sql.Identifier, spec.primary_key))
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
                table(schema, spec.base, version), columns, key
            )
        )
    if indexes:
        create_indexes(conn, schema, name, version)


def create_indexes(conn: psycopg.Connection[Any], schema: str, name: str, version: int) -> None:
    for spec in SCHEMAS[name].tables:
        for number, keys in enumerate(spec.indexes):
            conn.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
                    sql.Identifier(f"{table_name(spec.base, version)}_i{number}"),
                    table(schema, spec.base, version),
                    sql.SQL(", ").join(_key(k) for k in keys),
                )
            )


def _key(expression: str) -> sql.Composable:
    column, _, direction = expression.partition(" ")
    if direction not in ("", "ASC", "DESC"):
        raise ValueError(f"bad index key {expression!r}")
    return sql.SQL(" ").join([sql.Identifier(column), sql.SQL(direction)])


def drop_version(conn: psycopg.Connection[Any], schema: str, name: str, version: int) -> None:
    for spec in SCHEMAS[name].tables:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table(schema, spec.base, version)))


def point_views(conn: psycopg.Connection[Any], schema: str, name: str, version: int) -> None:
    """Make projection ``name``'s stable views read version ``version`` (in the caller's
    transaction, so readers switch from one version to the next atomically)."""
    for view in SCHEMAS[name].views:
        columns = (
            sql.SQL(", ").join(map(sql.Identifier, view.columns))
            if view.columns is not None
            else sql.SQL("*")
        )
        source = sql.SQL("SELECT {} FROM {}").format(columns, table(schema, view.table, version))
        target = sql.Identifier(schema, view.name)
        try:
            with conn.transaction():  # a savepoint: the fallback below must still run
                conn.execute(sql.SQL("CREATE OR REPLACE VIEW {} AS {}").format(target, source))
        except psycopg.errors.InvalidTableDefinition:
            # The new version's columns differ (a schema change): replace the view outright.
            conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(target))
            conn.execute(sql.SQL("CREATE VIEW {} AS {}").format(target, source))


def insert_tracking(
    conn: psycopg.Connection[Any], schema: str, name: str, version: int, state: State
) -> None:
    conn.execute(
        sql.SQL("INSERT INTO {} (name, version, position, state) VALUES (%s, %s, 0, %s)").format(
            tracking_table(schema)
        ),
        (name, version, state),
    )


def tracked(conn: psycopg.Connection[Any], schema: str, name: str | None = None) -> list[Tracked]:
    """Tracking rows (of ``name``, or all), by name and version."""
    query = sql.SQL("SELECT name, version, position, state FROM {}").format(tracking_table(schema))
    if name is not None:
        rows = conn.execute(query + sql.SQL(" WHERE name = %s ORDER BY version"), (name,))
    else:
        rows = conn.execute(query + sql.SQL(" ORDER BY name, version"))
    return [Tracked(*row) for row in rows.fetchall()]


def live(conn: psycopg.Connection[Any], schema: str, name: str) -> Tracked | None:
    return next((t for t in tracked(conn, schema, name) if t.state == "live"), None)


def set_position(
    conn: psycopg.Connection[Any], schema: str, name: str, version: int, position: int
) -> None:
    conn.execute(
        sql.SQL(
            "UPDATE {} SET position = %s, updated_at = now() WHERE name = %s AND version = %s"
        ).format(tracking_table(schema)),
        (position, name, version),
    )


def set_positions(
    conn: psycopg.Connection[Any], schema: str, positions: Sequence[tuple[str, int, int]]
) -> None:
    """:func:`set_position` for each ``(name, version, position)``, in one round trip."""
    if not positions:
        return
    names, versions, reached = zip(*positions, strict=True)
    conn.execute(
        sql.SQL(
            "UPDATE {} AS t SET position = u.position, updated_at = now()"
            " FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS u(name, version, position)"
            " WHERE t.name = u.name AND t.version = u.version"
        ).format(tracking_table(schema)),
        (list(names), list(versions), list(reached)),
    )


def set_state(
    conn: psycopg.Connection[Any], schema: str, name: str, version: int, state: State
) -> None:
    conn.execute(
        sql.SQL(
            "UPDATE {} SET state = %s, updated_at = now() WHERE name = %s AND version = %s"
        ).format(tracking_table(schema)),
        (state, name, version),
    )


def delete_tracking(conn: psycopg.Connection[Any], schema: str, name: str, version: int) -> None:
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE name = %s AND version = %s").format(tracking_table(schema)),
        (name, version),
    )


def store_head(conn: psycopg.Connection[Any], schema: str) -> int:
    """The event store's newest position: the application is named ``ledgerflow`` (ADR 2)."""
    row = conn.execute(
        sql.SQL("SELECT COALESCE(MAX(notification_id), 0) FROM {}").format(
            sql.Identifier(schema, "ledgerflow_events")
        )
    ).fetchone()
    return int(row[0]) if row else 0
