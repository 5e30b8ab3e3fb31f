"""The domain's exception tree: every error a command can meet, each with a stable code."""

from __future__ import annotations

from typing import ClassVar
from uuid import UUID


class DomainError(Exception):
    """A command was refused by the domain; nothing was appended.

    ``code`` is the stable machine-readable error code of the external contract
    (DESIGN.md section 4); ``message`` is for humans.
    """

    code: ClassVar[str] = "invalid_state"
    reason: str | None = None
    """A finer, stable machine-readable reason within ``code`` (in the reply's details)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def details(self) -> list[dict[str, str]]:
        return [{"reason": self.reason}] if self.reason else []


class InvalidCommandError(DomainError, ValueError):
    """The command's arguments are malformed (a ``ValueError``, so pydantic reports it)."""

    code = "invalid_command"


class InvalidPolicyError(InvalidCommandError):
    """A retry policy, timeout or concurrency setting is out of range."""


class InvalidStateError(DomainError):
    """The command is well formed but not allowed in the aggregate's current state."""

    code = "invalid_state"


class RunNotActiveError(InvalidStateError):
    """The run has ended (completed, failed or cancelled) and accepts nothing more."""

    def __init__(self, run_id: UUID, status: str) -> None:
        super().__init__(f"run {run_id} is {status} and accepts no more commands")
        self.run_id = run_id
        self.status = status


class StepNotFoundError(InvalidStateError):
    """The step was never started in this run."""

    def __init__(self, run_id: UUID, step: str) -> None:
        super().__init__(f"run {run_id} has no step {step!r}")


class StepAlreadyCompletedError(InvalidStateError):
    """A completed step is memoised: it never runs again."""

    def __init__(self, run_id: UUID, step: str) -> None:
        super().__init__(f"step {step!r} of run {run_id} has already completed")


class AttemptMismatchError(InvalidStateError):
    """The attempt number is not the one the run expects next (or has started)."""


class SupersededError(InvalidStateError):
    """A worker acts on an older hand-off of the run than the latest: it must let go."""

    reason = "superseded"

    def __init__(self, run_id: UUID, dispatch: int, latest: int) -> None:
        super().__init__(
            f"run {run_id} was handed off again (dispatch {latest}); dispatch {dispatch} is stale"
        )


class RetriesExhaustedError(InvalidStateError):
    """The step has used every attempt its retry policy allows."""

    reason = "retries_exhausted"


class StepsPendingError(InvalidStateError):
    """``complete_run`` names steps whose completions are not recorded yet: a completion
    sent just before it has not been applied (or was refused). ADR 16."""

    reason = "steps_pending"

    def __init__(self, run_id: UUID, steps: list[str]) -> None:
        super().__init__(
            f"run {run_id} cannot complete before step(s) {', '.join(map(repr, steps))} "
            "have completed"
        )
        self.steps = steps


class NotPendingError(InvalidStateError):
    """A timer, wait or child of that name was never started in this run."""


class EventNotFoundError(InvalidCommandError):
    """A command names an inbound event that was never sent."""

    def __init__(self, event_id: UUID) -> None:
        super().__init__(f"event {event_id} not found")
        self.event_id = event_id


class RunNotFoundError(DomainError):
    """No run has this id."""

    code = "run_not_found"

    def __init__(self, run_id: UUID) -> None:
        super().__init__(f"run {run_id} not found")
        self.run_id = run_id


class UnknownWorkflowError(DomainError):
    """No workflow of that name is registered."""

    code = "unknown_workflow"

    def __init__(self, workflow: str) -> None:
        super().__init__(f"workflow {workflow!r} is not registered")
        self.workflow = workflow


class ConcurrencyConflictError(DomainError):
    """Another writer kept changing the same aggregate; the command was not applied."""

    code = "conflict"
