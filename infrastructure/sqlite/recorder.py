"""The SQLite recorder, extended with the command log written in the events' transaction.

The embedded counterpart of ``infrastructure/postgres/recorder.py``: the same contract
(``services.command_log.CommandLog``), so ``ledgerflow dev`` dedups commands exactly as
``ledgerflow serve`` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteCursor, SQLiteDatastore

from domain.values import JSON
from services.command_log import CommandRecord, with_positions


class SQLiteCommandRecorder(SQLiteApplicationRecorder):
    """Inserts each command's id and reply in the same transaction as its events; the
    command_id primary key makes a duplicate roll the whole save back."""

    def __init__(self, datastore: SQLiteDatastore, events_table_name: str = "stored_events"):
        super().__init__(datastore, events_table_name)

    @property
    def commands_table_name(self) -> str:
        return f"{self.events_table_name.removesuffix('_events')}_commands"

    def construct_create_table_statements(self) -> list[str]:
        return [
            *super().construct_create_table_statements(),
            f"CREATE TABLE IF NOT EXISTS {self.commands_table_name} ("
            "command_id TEXT PRIMARY KEY, "
            "name TEXT NOT NULL, "
            "reply TEXT NOT NULL, "
            "position INTEGER NOT NULL, "
            "created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)",
        ]

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        notification_ids = super()._insert_events(c, stored_events, **kwargs)
        commands: Sequence[CommandRecord] = kwargs.get("commands", ())
        if commands and notification_ids:
            c.executemany(
                f"INSERT INTO {self.commands_table_name} (command_id, name, reply, position) "
                "VALUES (?, ?, ?, ?)",
                [
                    (command_id, name, json.dumps(reply), reply["position"])
                    for command_id, name, reply in with_positions(commands, notification_ids)
                ],
            )
        return notification_ids

    def select_existing(self, originator_ids: Sequence[UUID]) -> set[UUID]:
        if not originator_ids:
            return set()
        found: set[UUID] = set()
        with self.datastore.transaction(commit=False) as c:
            for start in range(0, len(originator_ids), 500):
                chunk = [i.hex for i in originator_ids[start : start + 500]]
                marks = ", ".join("?" * len(chunk))
                c.execute(
                    f"SELECT DISTINCT originator_id FROM {self.events_table_name} "
                    f"WHERE originator_id IN ({marks})",
                    chunk,
                )
                found.update(UUID(row["originator_id"]) for row in c.fetchall())
        return found

    def select_command_replies(self, command_ids: Sequence[str]) -> dict[str, dict[str, JSON]]:
        if not command_ids:
            return {}
        replies: dict[str, dict[str, JSON]] = {}
        with self.datastore.transaction(commit=False) as c:
            for start in range(0, len(command_ids), 500):
                chunk = list(command_ids[start : start + 500])
                marks = ", ".join("?" * len(chunk))
                c.execute(
                    f"SELECT command_id, reply FROM {self.commands_table_name} "
                    f"WHERE command_id IN ({marks})",
                    chunk,
                )
                replies.update(
                    {row["command_id"]: json.loads(row["reply"]) for row in c.fetchall()}
                )
        return replies
