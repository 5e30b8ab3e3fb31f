"""The WorkflowType aggregate: a registered workflow, its policies and its workers."""

from __future__ import annotations

from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.errors import InvalidCommandError
from domain.values import JSON, Concurrency, RetryPolicy, Timeouts, check_name
from domain.workflow_run import WorkflowRun

MAX_TRIGGERS = 50


class WorkflowType(Aggregate):
    """One per workflow name; workers register it, and re-registering is idempotent."""

    class Registered(Aggregate.Created):
        name: str
        definition: dict[str, JSON]

    class DefinitionChanged(Aggregate.Event):
        definition: dict[str, JSON]

    class WorkerJoined(Aggregate.Event):
        worker_id: str

    class WorkerLeft(Aggregate.Event):
        worker_id: str

    @classmethod
    def register(
        cls,
        type_id: UUID,
        name: str,
        triggers: list[str] | None = None,
        retry_policy: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        concurrency: Concurrency | None = None,
        queue: str = "default",
    ) -> WorkflowType:
        check_name("workflow", name)
        definition = cls.definition_of(triggers, retry_policy, timeouts, concurrency, queue)
        return cls._create(cls.Registered, id=type_id, name=name, definition=definition)

    @staticmethod
    def definition_of(
        triggers: list[str] | None,
        retry_policy: RetryPolicy | None,
        timeouts: Timeouts | None,
        concurrency: Concurrency | None,
        queue: str,
    ) -> dict[str, JSON]:
        """The workflow's policies as one comparable JSON value (validated here)."""
        triggers = list(triggers or [])
        if len(triggers) > MAX_TRIGGERS:
            raise InvalidCommandError(f"a workflow has at most {MAX_TRIGGERS} triggers")
        for trigger in triggers:
            check_name("trigger event", trigger)
        check_name("queue", queue)
        return {
            "triggers": sorted(set(triggers)),
            "retry_policy": (retry_policy or RetryPolicy()).to_json(),
            "timeouts": (timeouts or Timeouts()).to_json(),
            "concurrency": (concurrency or Concurrency()).to_json(),
            "queue": queue,
        }

    @event(Registered)
    def __init__(self, name: str, definition: dict[str, JSON]) -> None:
        self.name = name
        self.definition = definition
        self.workers: set[str] = set()

    def redefine(self, definition: dict[str, JSON]) -> None:
        """A newer worker brings a new definition; the same one appends nothing."""
        if definition != self.definition:
            self._definition_changed(definition)

    @event(DefinitionChanged)
    def _definition_changed(self, definition: dict[str, JSON]) -> None:
        self.definition = definition

    def add_worker(self, worker_id: str) -> None:
        if not worker_id or len(worker_id) > 200:
            raise InvalidCommandError("worker id must be 1..200 characters")
        if worker_id not in self.workers:
            self._worker_joined(worker_id)

    @event(WorkerJoined)
    def _worker_joined(self, worker_id: str) -> None:
        self.workers.add(worker_id)

    def remove_worker(self, worker_id: str) -> None:
        if worker_id in self.workers:
            self._worker_left(worker_id)

    @event(WorkerLeft)
    def _worker_left(self, worker_id: str) -> None:
        self.workers.discard(worker_id)

    def new_run(
        self,
        run_id: UUID,
        input: JSON,
        key: str | None = None,
        parent_run_id: UUID | None = None,
        parent_step: str | None = None,
        triggered_by: UUID | None = None,
        eager: bool = False,
    ) -> WorkflowRun:
        """A run of this workflow, under the workflow's retry policy and timeouts.

        Without a concurrency limit, nothing can hold a run back: it is handed to the
        workflow's queue in the same transaction (ADR 13), or with ``eager`` to the
        starter's own worker (ADR 17). A limited one waits for the scheduler, which
        holds a slot for it or queues it (``eager`` is then ignored).
        """
        return WorkflowRun.start(
            run_id,
            self.name,
            input,
            key=key,
            retry_policy=self.retry_policy,
            timeouts=self.timeouts,
            parent_run_id=parent_run_id,
            parent_step=parent_step,
            triggered_by=triggered_by,
            queue=self.queue if self.concurrency.limit is None else None,
            eager=eager,
        )

    @property
    def queue(self) -> str:
        return str(self.definition["queue"])

    @property
    def triggers(self) -> list[str]:
        return list(self.definition["triggers"])

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy.from_json(self.definition["retry_policy"])

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts.from_json(self.definition["timeouts"])

    @property
    def concurrency(self) -> Concurrency:
        return Concurrency.from_json(self.definition["concurrency"])
