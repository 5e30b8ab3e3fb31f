"""The SDK's telemetry: log context, step metrics, and a run's trace (off unless enabled)."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Coroutine, Iterator
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar
from uuid import UUID

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    TracerProvider,
)
from prometheus_client import Counter, Histogram

T = TypeVar("T")

# ------------------------------------------------------------------------ log context
RUN_ID: ContextVar[str | None] = ContextVar("ledgerflow_run_id", default=None)
"""The run the current work concerns (logged as ``run_id``)."""
POSITION: ContextVar[int | None] = ContextVar("ledgerflow_position", default=None)
"""The global position of the event the current work follows from (logged as ``position``)."""
ROLE: ContextVar[str | None] = ContextVar("ledgerflow_role", default=None)
"""The role doing the work (``commands``, ``relay``, ``worker``...), logged as ``role``."""


@contextlib.contextmanager
def log_context(run_id: object = None, position: int | None = None) -> Iterator[None]:
    """Every log line written inside carries ``run_id`` (and ``position``, when given)."""
    run_token = RUN_ID.set(str(run_id)) if run_id is not None else None
    position_token = POSITION.set(position) if position is not None else None
    try:
        yield
    finally:
        if position_token is not None:
            POSITION.reset(position_token)
        if run_token is not None:
            RUN_ID.reset(run_token)


async def as_role(role: str, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` with ``role`` in its log lines (run it as its own asyncio task)."""
    ROLE.set(role)  # a task runs in a copy of the context: this stays inside it
    return await work


# ---------------------------------------------------------------------- step metrics
STEP_SECONDS = Histogram(
    "ledgerflow_step_duration_seconds",
    "Seconds one attempt of a step took in the worker (its function only)",
    ["workflow", "step"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
STEP_ATTEMPTS = Counter(
    "ledgerflow_step_attempts_total",
    "Step attempts a worker ran, by outcome: completed, failed, timed_out, non_retryable,"
    " interrupted",
    ["workflow", "step", "outcome"],
)


# --------------------------------------------------------------------------- tracing
class Tracing:
    """Whether this process traces, and with which tracer. Everything checks ``enabled``
    first, so that tracing off costs one attribute read on the hot paths."""

    def __init__(self) -> None:
        self.enabled = False
        self.tracer: Tracer = trace.NoOpTracer()

    def enable(self, provider: TracerProvider) -> None:
        from ledgerflow import __version__

        self.tracer = provider.get_tracer("ledgerflow", __version__)
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False
        self.tracer = trace.NoOpTracer()


TRACING = Tracing()

HEADER_TRACEPARENT = "traceparent"


def trace_id_of(aggregate_id: UUID | str) -> int:
    """The trace of a run (of any aggregate): its uuid's 128 bits, so that every component
    can add spans to a run's trace knowing only the run id."""
    return (aggregate_id if isinstance(aggregate_id, UUID) else UUID(str(aggregate_id))).int


def root_span_id(aggregate_id: UUID | str) -> int:
    """The span id of the run's own span (the trace's root), derived from the run id too."""
    uuid = aggregate_id if isinstance(aggregate_id, UUID) else UUID(str(aggregate_id))
    digest = hashlib.blake2b(uuid.bytes, digest_size=8, person=b"ledgerflow-run").digest()
    return int.from_bytes(digest, "big") or 1


def run_context(aggregate_id: UUID | str) -> Context:
    """A context whose parent span is the run's root span: spans started in it join the
    run's trace."""
    parent = SpanContext(
        trace_id=trace_id_of(aggregate_id),
        span_id=root_span_id(aggregate_id),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent), Context())


def parse_traceparent(value: str | None) -> SpanContext | None:
    """The span context of a W3C ``traceparent`` value; None when absent or malformed."""
    if not value:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or parts[0] == "ff":
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if trace_id == 0 or span_id == 0:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 0xFF))


def format_traceparent(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def parent_in_run(aggregate_id: UUID | str, traceparent: str | None) -> Context:
    """The context to continue a run's trace from: ``traceparent`` when it belongs to the
    run's trace, else the run's root span."""
    remote = parse_traceparent(traceparent)
    if remote is not None and remote.trace_id == trace_id_of(aggregate_id):
        return trace.set_span_in_context(NonRecordingSpan(remote), Context())
    return run_context(aggregate_id)


def outgoing_headers() -> dict[str, str] | None:
    """Headers for a command request: the current span's ``traceparent`` when tracing."""
    if not TRACING.enabled:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return {HEADER_TRACEPARENT: format_traceparent(context)}


@contextlib.contextmanager
def task_scope(
    run_id: str, position: int, traceparent: str | None, **attributes: str | int
) -> Iterator[None]:
    """A worker's work on one task: logged with the run and the task's position, and, when
    tracing, a span continuing the run's trace from the task message's ``traceparent``."""
    with log_context(run_id, position):
        if not TRACING.enabled:
            yield
            return
        with TRACING.tracer.start_as_current_span(
            "ledgerflow.task",
            context=parent_in_run(run_id, traceparent),
            kind=SpanKind.CONSUMER,
            attributes={
                "ledgerflow.run_id": run_id,
                "ledgerflow.position": position,
                **{f"ledgerflow.{key}": value for key, value in attributes.items()},
            },
        ):
            yield


class TaskLike(Protocol):
    """What a worker knows of a task (the transport's Task)."""

    run_id: str
    dispatch: int
    reason: str
    queue: str
    position: int


async def in_task_scope(task: TaskLike, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``, the worker's handling of ``task``, inside :func:`task_scope`."""
    with task_scope(
        task.run_id,
        task.position,
        getattr(task, "traceparent", None),
        dispatch=task.dispatch,
        reason=task.reason,
        queue=task.queue,
    ):
        return await work


class StepAttempt:
    """One attempt of a step: its duration and outcome go to the step metrics."""

    def __init__(self, workflow: str, step: str, attempt: int, span: Span | None) -> None:
        self.workflow = workflow
        self.step = step
        self.attempt = attempt
        self.span = span
        self._began: float | None = None
        self.outcome: str | None = None

    def begin(self) -> None:
        """The step's function starts now (recording its start is not part of its time)."""
        self._began = time.perf_counter()

    def end(self, outcome: str) -> None:
        """The function returned (``completed``) or raised (``failed``, ``timed_out``...)."""
        if self._began is None or self.outcome is not None:
            return
        self.outcome = outcome
        STEP_SECONDS.labels(self.workflow, self.step).observe(time.perf_counter() - self._began)
        STEP_ATTEMPTS.labels(self.workflow, self.step, outcome).inc()
        if self.span is not None:
            self.span.set_attribute("ledgerflow.outcome", outcome)
            if outcome != "completed":
                self.span.set_status(Status(StatusCode.ERROR, outcome))


@contextlib.contextmanager
def step_attempt(run_id: str, workflow: str, step: str, attempt: int) -> Iterator[StepAttempt]:
    """Measure one attempt of a step; when tracing, a span around it (and its recording)."""
    if not TRACING.enabled:
        observed = StepAttempt(workflow, step, attempt, None)
        try:
            yield observed
        finally:
            observed.end("interrupted")  # only when it began and ended no other way
        return
    with TRACING.tracer.start_as_current_span(
        f"step {step}",
        kind=SpanKind.INTERNAL,
        attributes={
            "ledgerflow.run_id": run_id,
            "ledgerflow.workflow": workflow,
            "ledgerflow.step": step,
            "ledgerflow.attempt": attempt,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        observed = StepAttempt(workflow, step, attempt, span)
        try:
            yield observed
        finally:
            observed.end("interrupted")
