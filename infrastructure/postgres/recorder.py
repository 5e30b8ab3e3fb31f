"""The PostgreSQL recorder, extended with the command log written in the events' transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier
from psycopg.types.json import Jsonb

from domain.values import JSON
from services.command_log import CommandRecord, with_positions


class CommandLoggingRecorder(PostgresApplicationRecorder):
    """Inserts each command's id and reply in the same transaction as its events.

    The command_id primary key makes a concurrent duplicate fail the whole insert, so a
    command is applied at most once however many service instances race on it.
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
