"""Commands: imperative, pydantic-validated requests that the WorkflowRuns service handles."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from domain.values import MAX_SECONDS, Concurrency, RetryPolicy, Timeouts, check_storable

JSONValue = Annotated[Any, AfterValidator(check_storable)]
"""Any JSON value a command carries, refused when the store could not give it back intact."""
JSONObject = Annotated[dict[str, Any], AfterValidator(check_storable)]


class Command(BaseModel):
    """Every command may carry a ``command_id``.

    The command service (the NATS/HTTP edge) records it durably with the events it caused
    and answers a repeat with the first reply; the handlers here do not see it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    command_id: str | None = Field(default=None, min_length=1, max_length=200)


class RunCommand(Command):
    run_id: UUID


# ---------------------------------------------------------------- client-facing commands
class FirstStep(BaseModel):
    """The step an eager run's workflow begins with, as the starter's worker found it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: str = Field(min_length=1, max_length=200)
    retry_policy: RetryPolicy | None = None


class StartRun(Command):
    workflow: str = Field(min_length=1, max_length=200)
    input: JSONValue = None
    key: str | None = Field(default=None, min_length=1, max_length=500)
    eager: bool = False
    """The starter's own worker runs the new run at once (ADR 17): the reply carries its
    snapshot, and no task is queued unless that worker lets it go. Ignored for a run
    that exists already (a keyed start) and for a workflow with a concurrency limit."""
    first_step: FirstStep | None = None
    """With ``eager``: the start also records the first attempt of this step, as
    ``start_step`` would under the eager hand-off (ADR 20), so the starter's worker runs
    it at once. Ignored whenever ``eager`` is (the run is not handed out)."""

    @model_validator(mode="after")
    def _first_step_is_eager(self) -> StartRun:
        if self.first_step is not None and not self.eager:
            raise ValueError("first_step needs eager: only the starter's worker may run it")
        return self


class SendEvent(Command):
    name: str = Field(min_length=1, max_length=200)
    data: JSONObject = Field(default_factory=dict)
    id: str | None = Field(default=None, min_length=1, max_length=500)


class CancelRun(RunCommand):
    reason: str | None = Field(default=None, max_length=2000)


class RetryRun(RunCommand):
    pass


# ---------------------------------------------------------------- worker-side commands
class RegisterWorkflow(Command):
    name: str = Field(min_length=1, max_length=200)
    triggers: list[str] = Field(default_factory=list)
    retry_policy: RetryPolicy | None = None
    timeouts: Timeouts | None = None
    concurrency: Concurrency | None = None
    queue: str = "default"
    worker_id: str | None = Field(default=None, min_length=1, max_length=200)


class StartStep(RunCommand):
    step: str = Field(min_length=1, max_length=200)
    attempt: int = Field(ge=1)
    retry_policy: RetryPolicy | None = None
    dispatch: int | None = Field(default=None, ge=1)
    """The hand-off the worker holds (its task's ``dispatch``): a stale one is refused."""


class CompleteStep(RunCommand):
    step: str = Field(min_length=1, max_length=200)
    attempt: int = Field(ge=1)
    output: JSONValue = None
    compensable: bool = False


class StepError(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = Field(min_length=1, max_length=200)
    message: str = Field(max_length=100_000)

    @model_validator(mode="after")
    def _storable(self) -> StepError:
        check_storable(self.model_dump(), "error")  # its extra fields are free JSON
        return self


class FailStep(RunCommand):
    step: str = Field(min_length=1, max_length=200)
    attempt: int = Field(ge=1)
    error: StepError
    retryable: bool = True


class StartSleep(RunCommand):
    name: str = Field(min_length=1, max_length=200)
    seconds: float | None = Field(default=None, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    until: datetime | None = None

    @model_validator(mode="after")
    def _one_of(self) -> StartSleep:
        if (self.seconds is None) == (self.until is None):
            raise ValueError("give exactly one of 'seconds' and 'until'")
        if self.until is not None and self.until.tzinfo is None:
            raise ValueError("'until' must carry a time zone")
        return self


class FireTimer(RunCommand):
    name: str = Field(min_length=1, max_length=200)


class StartWait(RunCommand):
    name: str = Field(min_length=1, max_length=200)
    event_name: str = Field(min_length=1, max_length=200)
    match: JSONObject = Field(default_factory=dict)
    timeout_seconds: float | None = Field(default=None, gt=0, le=MAX_SECONDS, allow_inf_nan=False)


class DeliverEvent(RunCommand):
    """Wake a run's wait with an inbound event (the event router sends this)."""

    name: str = Field(min_length=1, max_length=200)
    event_id: UUID


class TimeOutWait(RunCommand):
    name: str = Field(min_length=1, max_length=200)


class StartChild(RunCommand):
    name: str = Field(min_length=1, max_length=200)
    workflow: str = Field(min_length=1, max_length=200)
    input: JSONValue = None


class ResolveChild(RunCommand):
    """Resume a parent with the outcome of its ended child run."""

    name: str = Field(min_length=1, max_length=200)


class EmitEvent(RunCommand):
    """A run sends an event (``ctx.send_event``): recorded once, then routed like any other."""

    name: str = Field(min_length=1, max_length=200)
    event_name: str = Field(min_length=1, max_length=200)
    data: JSONObject = Field(default_factory=dict)


class CompleteRun(RunCommand):
    output: JSONValue = None
    after_steps: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=1000
    )
    """Steps the run must have completed: the worker names every step its replay
    completed, some of whose completions it sent just before, unanswered; else the
    command is refused with ``steps_pending`` (ADR 16)."""


class FailRun(RunCommand):
    error: StepError


class TimeOutRun(RunCommand):
    pass


class DispatchRun(RunCommand):
    """Hand a run to its workflow's worker queue (the scheduler sends this)."""

    reason: str = Field(min_length=1, max_length=200)
    cause: int = Field(ge=1)
    """Global position of the event that made the run movable: a repeat is a no-op."""


class TriggerRun(Command):
    """Start a run of ``workflow`` for inbound event ``event_id`` (the event router sends
    this): one run per (event, workflow), however often it is sent."""

    event_id: UUID
    workflow: str = Field(min_length=1, max_length=200)


class LoadRun(RunCommand):
    """Read a run's current state from the store (a worker's first call on a task)."""


class CompensateStep(RunCommand):
    step: str = Field(min_length=1, max_length=200)


RunStatusName = Literal[
    "queued", "running", "sleeping", "waiting", "compensating", "completed", "failed", "cancelled"
]
