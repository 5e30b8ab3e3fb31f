"""The PostgreSQL recorder, extended with the command log written in the events' transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import (
    InterfaceError,
    OperationalError,
    ProgrammingError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.utils import retry
from psycopg import Cursor
from psycopg.errors import UndefinedFunction
from psycopg.rows import DictRow, tuple_row
from psycopg.sql import SQL, Identifier
from psycopg.types.json import Jsonb

from domain.values import JSON
from services.command_log import CommandRecord, with_positions


class CommandLoggingRecorder(PostgresApplicationRecorder):
    """Inserts each command's id and reply in the same transaction as its events.

    The command_id primary key makes a concurrent duplicate fail the whole insert, so a
    command is applied at most once however many service instances race on it.

    Events without command records (every command a worker sends) are inserted by one
    call of a PL/pgSQL function: one statement, one round trip, where eventsourcing's
    pipeline makes three and polls the socket while the commit is flushed. The function
    takes the same table lock and sends the same NOTIFY, so insert order is still commit
    order (docs/adr/0018-one-statement-insert.md).
    """

    def __init__(
        self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"
    ) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        prefix = events_table_name.removesuffix("_events")
        self.commands_table_name = f"{prefix}_commands"
        table = Identifier(self.datastore.schema, self.commands_table_name)
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                "command_id text PRIMARY KEY, "
                "name text NOT NULL, "
                "reply jsonb NOT NULL, "
                "position bigint NOT NULL, "
                "created_at timestamptz NOT NULL DEFAULT now())"
            ).format(table)
        )
        self._insert_commands = SQL(
            "INSERT INTO {} (command_id, name, reply, position) VALUES (%s, %s, %s, %s)"
        ).format(table)
        self._select_existing = SQL(
            "SELECT DISTINCT originator_id FROM {} WHERE originator_id = ANY(%s)"
        ).format(Identifier(self.datastore.schema, events_table_name))
        self._select_commands = SQL(
            "SELECT command_id, reply FROM {} WHERE command_id = ANY(%s)"
        ).format(table)
        self._select_events_after = SQL(
            "SELECT e.originator_id, e.originator_version, e.topic, e.state"
            " FROM unnest(%s::uuid[], %s::bigint[]) AS k(id, version)"
            " JOIN {} e ON e.originator_id = k.id AND e.originator_version > k.version"
            " ORDER BY e.originator_id, e.originator_version"
        ).format(Identifier(self.datastore.schema, events_table_name))

        self._select_rows_after = SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state"
            " FROM {} WHERE notification_id > %s ORDER BY notification_id LIMIT %s"
        ).format(Identifier(self.datastore.schema, events_table_name))

        self.insert_function_name = f"{prefix}_insert_events"
        function = Identifier(self.datastore.schema, self.insert_function_name)
        id_type = SQL(self.datastore.originator_id_type)
        self.sql_create_statements.append(
            SQL(
                "CREATE OR REPLACE FUNCTION {function}("
                "ids {id_type}[], versions bigint[], topics text[], states bytea[]) "
                "RETURNS SETOF bigint LANGUAGE plpgsql AS $body$ "
                "BEGIN "
                "SET LOCAL lock_timeout = '{lock_timeout}s'; "
                "LOCK TABLE {table} IN EXCLUSIVE MODE; "
                "NOTIFY {channel}; "
                "RETURN QUERY INSERT INTO {table} "
                "(originator_id, originator_version, topic, state) "
                "SELECT * FROM unnest(ids, versions, topics, states) "
                "RETURNING notification_id; "
                "END; $body$"
            ).format(
                function=function,
                id_type=id_type,
                lock_timeout=self.datastore.lock_timeout,
                table=Identifier(self.datastore.schema, events_table_name),
                channel=Identifier(self.channel_name),
            )
        )
        self._call_insert = SQL(
            "SELECT * FROM {}(%s::{id_type}[], %s::bigint[], %s::text[], %s::bytea[])"
        ).format(function, id_type=id_type)
        self.uses_insert_function = True
        """False once the function turned out missing (a database that `ledgerflow db
        init` has not upgraded): eventsourcing's own insert is used from then on."""

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        if stored_events and not kwargs.get("commands") and self.uses_insert_function:
            try:
                inserted: list[int] = self._insert_in_one_statement(stored_events)
                return inserted
            except ProgrammingError as e:
                if not isinstance(e.__cause__, UndefinedFunction):
                    raise
                self.uses_insert_function = False
        ids: Sequence[int] | None = super().insert_events(stored_events, **kwargs)
        return ids

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def _insert_in_one_statement(self, stored_events: Sequence[StoredEvent]) -> list[int]:
        params = (
            [e.originator_id for e in stored_events],
            [e.originator_version for e in stored_events],
            [e.topic for e in stored_events],
            [e.state for e in stored_events],
        )
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._call_insert, params, prepare=True)
            return [int(row[self.insert_function_name]) for row in curs.fetchall()]

    def _fetch_ids_after_insert_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        notification_ids = super()._fetch_ids_after_insert_events(curs, stored_events, **kwargs)
        commands: Sequence[CommandRecord] = kwargs.get("commands", ())
        if commands and notification_ids:
            rows = [
                (command_id, name, Jsonb(reply), reply["position"])
                for command_id, name, reply in with_positions(commands, notification_ids)
            ]
            # A nested pipeline syncs on exit, so a duplicate command_id raises here,
            # inside the insert's transaction, and nothing of the save is committed.
            with curs.connection.pipeline():
                curs.executemany(self._insert_commands, rows)
        return notification_ids

    def select_existing(self, originator_ids: Sequence[UUID]) -> set[UUID]:
        if not originator_ids:
            return set()
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._select_existing, (list(originator_ids),))
            return {row["originator_id"] for row in curs.fetchall()}

    def select_command_replies(self, command_ids: Sequence[str]) -> dict[str, dict[str, JSON]]:
        if not command_ids:
            return {}
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._select_commands, (list(command_ids),))
            return {row["command_id"]: row["reply"] for row in curs.fetchall()}

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def select_rows_after(self, after: int, limit: int) -> list[tuple[int, UUID, int, str, bytes]]:
        """The log after position ``after`` as plain rows, for readers of many events
        (the relay, rebuilds): eventsourcing's ``select_notifications`` without a dict and
        a Notification per row."""
        with self.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(self._select_rows_after, (after, limit), prepare=True)
            rows: list[tuple[int, UUID, int, str, bytes]] = curs.fetchall()  # bytea: bytes
            return rows

    def select_events_after(self, versions: Sequence[tuple[UUID, int]]) -> list[StoredEvent]:
        """The events of many aggregates after the version of each, in one query (a batch
        of commands brings its cached aggregates up to date with one round trip)."""
        if not versions:
            return []
        ids, after = [i for i, _ in versions], [v for _, v in versions]
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._select_events_after, (ids, after), prepare=True)
            return [
                StoredEvent(
                    originator_id=row["originator_id"],
                    originator_version=row["originator_version"],
                    topic=row["topic"],
                    state=bytes(row["state"]),
                )
                for row in curs.fetchall()
            ]
