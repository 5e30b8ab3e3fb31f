"""The InboundEvent aggregate: an event sent in, and the runs it started or woke."""

from __future__ import annotations

from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.errors import InvalidCommandError
from domain.values import JSON, check_key, check_name, check_step_name


class InboundEvent(Aggregate):
    """One per ``send_event``; the event router records its fan-out decisions here."""

    class Received(Aggregate.Created):
        name: str
        data: JSON
        external_id: str | None
        sent_by_run: UUID | None

    class RunTriggered(Aggregate.Event):
        workflow: str
        run_id: UUID

    class RunWoken(Aggregate.Event):
        run_id: UUID
        wait: str

    @classmethod
    def receive(
        cls,
        event_id: UUID,
        name: str,
        data: JSON,
        external_id: str | None = None,
        sent_by_run: UUID | None = None,
    ) -> InboundEvent:
        check_name("event", name)
        if not isinstance(data, dict):
            raise InvalidCommandError("event data must be a JSON object")
        check_key("event id", external_id)
        return cls._create(
            cls.Received,
            id=event_id,
            name=name,
            data=data,
            external_id=external_id,
            sent_by_run=sent_by_run,
        )

    @event(Received)
    def __init__(
        self, name: str, data: JSON, external_id: str | None, sent_by_run: UUID | None
    ) -> None:
        self.name = name
        self.data = data
        self.external_id = external_id
        self.sent_by_run = sent_by_run
        self.triggered: dict[str, UUID] = {}
        self.woken: set[tuple[UUID, str]] = set()

    def record_triggered_run(self, workflow: str, run_id: UUID) -> None:
        """Idempotent per workflow: an event starts at most one run of each workflow."""
        check_name("workflow", workflow)
        if workflow in self.triggered:
            return
        self._run_triggered(workflow, run_id)

    @event(RunTriggered)
    def _run_triggered(self, workflow: str, run_id: UUID) -> None:
        self.triggered[workflow] = run_id

    def record_woken_run(self, run_id: UUID, wait: str) -> None:
        check_step_name("wait", wait)
        if (run_id, wait) in self.woken:
            return
        self._run_woken(run_id, wait)

    @event(RunWoken)
    def _run_woken(self, run_id: UUID, wait: str) -> None:
        self.woken.add((run_id, wait))
