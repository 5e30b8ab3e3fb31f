"""The command log: each applied command_id and its reply, saved with the events it caused."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

from eventsourcing.persistence import IntegrityError, StoredEvent
from eventsourcing.popo import POPOApplicationRecorder

from domain.values import JSON


@dataclass(frozen=True)
class CommandRecord:
    """A command to log in the transaction that stores its events.

    ``event_index`` is the index, in the save's stored events, of the command's last
    event: the recorder learns its global position only as it inserts, and puts it in the
    reply as ``position``.
    """

    command_id: str
    name: str
    reply: dict[str, JSON]
    event_index: int


@runtime_checkable
class CommandLog(Protocol):
    def select_command_replies(self, command_ids: Sequence[str]) -> dict[str, dict[str, JSON]]:
        """The first reply of each command id that was applied before."""
        ...

    def select_existing(self, originator_ids: Sequence[UUID]) -> set[UUID]:
        """Which of these aggregates have events (one query for a whole batch)."""
        ...


def with_positions(
    commands: Sequence[CommandRecord], notification_ids: Sequence[int]
) -> list[tuple[str, str, dict[str, JSON]]]:
    """(command_id, name, reply) with each reply's position filled in from the ids."""
    return [
        (c.command_id, c.name, {**c.reply, "position": notification_ids[c.event_index]})
        for c in commands
    ]


class POPOCommandRecorder(POPOApplicationRecorder):
    """The in-memory recorder, logging commands under the same lock as their events."""

    def __init__(self) -> None:
        super().__init__()
        self._replies: dict[str, dict[str, JSON]] = {}

    def _update_table(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        commands: Sequence[CommandRecord] = kwargs.get("commands", ())
        if any(c.command_id in self._replies for c in commands):
            raise IntegrityError("command already applied")  # checked before any insert
        notification_ids = super()._update_table(stored_events, **kwargs)
        assert notification_ids is not None
        for command_id, _, reply in with_positions(commands, notification_ids):
            self._replies[command_id] = reply
        return notification_ids

    def select_command_replies(self, command_ids: Sequence[str]) -> dict[str, dict[str, JSON]]:
        with self._database_lock:
            return {i: self._replies[i] for i in command_ids if i in self._replies}

    def select_existing(self, originator_ids: Sequence[UUID]) -> set[UUID]:
        with self._database_lock:
            return {i for i in originator_ids if self._stored_events_index.get(str(i))}
