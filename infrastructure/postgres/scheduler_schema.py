"""The scheduler's tables (timers, eager leases, waits, triggers, parent links,
concurrency limits and slots) and its tracked position."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from infrastructure.postgres.read_model_schema import LOCK_CLASS
from infrastructure.postgres.schema import PostgresParams
from infrastructure.settings import Settings

TIMERS = "ledgerflow_scheduler_timers"
LEASES = "ledgerflow_scheduler_leases"
WAITS = "ledgerflow_scheduler_waits"
TRIGGERS = "ledgerflow_scheduler_triggers"
RUNS = "ledgerflow_scheduler_runs"
LIMITS = "ledgerflow_scheduler_limits"
SLOTS = "ledgerflow_scheduler_slots"
POSITION = "ledgerflow_scheduler_position"
NAME = "scheduler"
"""The scheduler's row in its position table (and the name of its durable consumer)."""

_DDL = (
    "CREATE TABLE IF NOT EXISTS {timers} ("
    " run_id uuid NOT NULL, kind text NOT NULL, name text NOT NULL,"
    " due_at timestamptz NOT NULL, cause bigint NOT NULL DEFAULT 0,"
    " PRIMARY KEY (run_id, kind, name))",
    "CREATE INDEX IF NOT EXISTS {timers_due} ON {timers} (due_at)",
    # Eagerly started runs, left to their starters' workers until due_at (ADR 17).
    "CREATE TABLE IF NOT EXISTS {leases} ("
    " run_id uuid NOT NULL PRIMARY KEY, due_at timestamptz NOT NULL, cause bigint NOT NULL,"
    " suspect boolean NOT NULL DEFAULT false)",
    "CREATE INDEX IF NOT EXISTS {leases_due} ON {leases} (due_at)",
    "CREATE TABLE IF NOT EXISTS {waits} ("
    " run_id uuid NOT NULL, name text NOT NULL, event_name text NOT NULL,"
    " match text NOT NULL, PRIMARY KEY (run_id, name))",
    "CREATE INDEX IF NOT EXISTS {waits_event} ON {waits} (event_name)",
    "CREATE TABLE IF NOT EXISTS {triggers} ("
    " type_id uuid NOT NULL PRIMARY KEY, workflow text NOT NULL, event_names text[] NOT NULL)",
    "CREATE TABLE IF NOT EXISTS {runs} ("
    " run_id uuid NOT NULL PRIMARY KEY, parent_run_id uuid NOT NULL, parent_step text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS {limits} ("
    " type_id uuid NOT NULL PRIMARY KEY, workflow text NOT NULL,"
    " max_runs integer, key_field text)",
    "CREATE INDEX IF NOT EXISTS {limits_workflow} ON {limits} (workflow)",
    # One row per run of a limited workflow: holding a slot, queued for one (since the
    # position of the event that queued it), or ended (a failed run, kept for a retry).
    "CREATE TABLE IF NOT EXISTS {slots} ("
    " run_id uuid NOT NULL PRIMARY KEY, workflow text NOT NULL, key_value text NOT NULL,"
    " state text NOT NULL CHECK (state IN ('held', 'queued', 'ended')),"
    " since bigint NOT NULL)",
    "CREATE INDEX IF NOT EXISTS {slots_group} ON {slots} (workflow, key_value, state, since)",
    "CREATE TABLE IF NOT EXISTS {position} ("
    " name text NOT NULL PRIMARY KEY, position bigint NOT NULL DEFAULT 0,"
    " updated_at timestamptz NOT NULL DEFAULT now())",
    "INSERT INTO {position} (name) VALUES ('scheduler') ON CONFLICT DO NOTHING",
)


class SchedulerTablesMissingError(RuntimeError):
    """The scheduler's tables were never created (``ledgerflow db init`` creates them)."""


def identifiers(schema: str) -> dict[str, sql.Identifier]:
    return {
        "timers": sql.Identifier(schema, TIMERS),
        "timers_due": sql.Identifier(f"{TIMERS}_due"),
        "leases": sql.Identifier(schema, LEASES),
        "leases_due": sql.Identifier(f"{LEASES}_due"),
        "waits": sql.Identifier(schema, WAITS),
        "waits_event": sql.Identifier(f"{WAITS}_event"),
        "triggers": sql.Identifier(schema, TRIGGERS),
        "runs": sql.Identifier(schema, RUNS),
        "limits": sql.Identifier(schema, LIMITS),
        "limits_workflow": sql.Identifier(f"{LIMITS}_workflow"),
        "slots": sql.Identifier(schema, SLOTS),
        "slots_group": sql.Identifier(f"{SLOTS}_group"),
        "position": sql.Identifier(schema, POSITION),
    }


def init_scheduler(settings: Settings) -> None:
    """Create the scheduler's tables if missing (``ledgerflow db init``; idempotent)."""
    conninfo = PostgresParams.from_url(settings.database_url).conninfo()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        create_scheduler_tables(conn, settings.db_schema)


def create_scheduler_tables(conn: psycopg.Connection[Any], schema: str = "public") -> None:
    names = identifiers(schema)
    with conn.transaction():
        lock(conn, schema)  # two `db init` at once would race on CREATE ... IF NOT EXISTS
        for statement in _DDL:
            conn.execute(sql.SQL(statement).format(**names))


def lock(conn: psycopg.Connection[Any], schema: str) -> None:
    """Serialise the scheduler's batches (several instances) until the transaction ends."""
    key = (LOCK_CLASS + 2, f"{schema}.{NAME}")
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", key)


def position(conn: psycopg.Connection[Any], schema: str) -> int:
    row = conn.execute(
        sql.SQL("SELECT position FROM {} WHERE name = %s").format(sql.Identifier(schema, POSITION)),
        (NAME,),
    ).fetchone()
    if row is None:
        raise SchedulerTablesMissingError(
            f"{POSITION} has no row {NAME!r}: run `ledgerflow db init`"
        )
    return int(row[0])


def set_position(conn: psycopg.Connection[Any], schema: str, value: int) -> None:
    conn.execute(
        sql.SQL("UPDATE {} SET position = %s, updated_at = now() WHERE name = %s").format(
            sql.Identifier(schema, POSITION)
        ),
        (value, NAME),
    )
