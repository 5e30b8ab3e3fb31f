"""Given commands, when a command, then new events or an error: over the real service layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar
from uuid import UUID

from eventsourcing.domain import DomainEventProtocol

from domain.errors import DomainError
from domain.workflow_run import WorkflowRun
from services import commands as c
from services.clock import ManualClock
from services.workflow_runs import Reply, WorkflowRuns

Event = DomainEventProtocol[UUID]
E = TypeVar("E")


class Scenario:
    """One in-memory event store, a clock that moves only when told, jitter-free retries."""

    def __init__(self) -> None:
        self.clock = ManualClock()
        self.app = WorkflowRuns(
            env={"PERSISTENCE_MODULE": "eventsourcing.popo"}, clock=self.clock, rand=lambda: 0.5
        )
        self.reply: Reply | None = None
        self.error: DomainError | None = None
        self.new_events: list[Event] = []
        self.head_before = 0

    def apply(self, command: c.Command) -> Reply:
        """Send one command through the service, as a client or worker would."""
        return self.app.handle(command)

    def given(self, *commands: c.Command) -> Scenario:
        for command in commands:
            self.apply(command)
        return self

    def when(self, command: c.Command) -> Scenario:
        """Apply ``command``; record its reply or domain error and the events it appended."""
        self.head_before = self.head()
        self.reply, self.error = None, None
        try:
            self.reply = self.apply(command)
        except DomainError as error:
            self.error = error
        self.new_events = self.events_after(self.head_before)
        return self

    def then_events(self, names: Sequence[str]) -> list[Event]:
        """Assert the type names of the events the command appended, in order; return them."""
        assert self.error is None, (
            f"expected {list(names)}, but the command was refused: {self.error!r}"
        )
        assert [type(e).__name__ for e in self.new_events] == list(names)
        return self.new_events

    def then_error(self, kind: type[DomainError]) -> DomainError:
        """Assert the command was refused with exactly ``kind`` and appended nothing."""
        assert type(self.error) is kind, f"expected {kind.__name__}, got {self.error!r}"
        assert self.head() == self.head_before, f"a refused command appended {self.new_events}"
        return self.error

    def event(self, kind: type[E]) -> E:
        """The one event of class ``kind`` the command appended."""
        found = [e for e in self.new_events if isinstance(e, kind)]
        assert len(found) == 1, f"expected one {kind.__qualname__}, got {self.new_events}"
        return found[0]

    def head(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def events_after(self, position: int) -> list[Event]:
        """Every event after ``position``, read page by page from the notification log."""
        log = self.app.notification_log
        events: list[Event] = []
        while page := log.select(start=position + 1, limit=log.section_size):
            events.extend(self.app.mapper.to_domain_event(n) for n in page)
            position = page[-1].id
        return events

    def run(self, run_id: UUID) -> WorkflowRun:
        return self.app.get_run(run_id)
