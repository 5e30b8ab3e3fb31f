"""OpenTelemetry tracing of the service roles: one trace per run (ADR 11), off by default."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
)

from domain.ids import inbound_event_id, run_id_for, workflow_type_id
from domain.values import JSON
from infrastructure.settings import Settings
from ledgerflow._telemetry import (
    TRACING,
    format_traceparent,
    parse_traceparent,
    root_span_id,
    run_context,
)
from projections.records import EventRecord
from services import commands as c

log = logging.getLogger("ledgerflow.telemetry")

SERVER_ERRORS = frozenset({"internal", "unavailable"})
"""Command outcomes that mark a span as an error (a refusal is the domain working)."""

_FORCED: ContextVar[tuple[int | None, int | None] | None] = ContextVar(
    "ledgerflow_forced_ids", default=None
)


class DerivedIds(RandomIdGenerator):
    """Random ids, except where ledgerflow derives them: a run's own span, and each event's
    span (its global position), which other processes name in ``traceparent`` headers."""

    def generate_trace_id(self) -> int:
        forced = _FORCED.get()
        if forced is not None and forced[0] is not None:
            return forced[0]
        return super().generate_trace_id()

    def generate_span_id(self) -> int:
        forced = _FORCED.get()
        if forced is not None and forced[1] is not None:
            return forced[1]
        return super().generate_span_id()


@contextlib.contextmanager
def _derived(trace_id: int | None = None, span_id: int | None = None) -> Iterator[None]:
    """Start exactly one span inside: it gets these ids."""
    token = _FORCED.set((trace_id, span_id))
    try:
        yield
    finally:
        _FORCED.reset(token)


# ----------------------------------------------------------------------- configuration
def configure_tracing(
    settings: Settings,
    *,
    role: str = "ledgerflow",
    exporter: SpanExporter | None = None,
    set_global: bool = False,
) -> TracerProvider | None:
    """Trace with ``settings.otel_exporter`` (or ``exporter``, exported span by span: for
    tests); None, and tracing off, when it is ``none``.

    ``set_global`` makes the provider OpenTelemetry's global one too, so that spans the
    workflow code makes (an instrumented HTTP client in a step) join the run's trace.
    """
    processor: SpanProcessor
    if exporter is not None:
        processor = SimpleSpanProcessor(exporter)
    elif settings.otel_exporter == "none":
        TRACING.disable()
        return None
    else:
        processor = BatchSpanProcessor(_exporter(settings.otel_exporter))
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if named else {"service.name": f"ledgerflow-{role}"})
    provider = TracerProvider(resource=resource, id_generator=DerivedIds())
    provider.add_span_processor(processor)
    TRACING.enable(provider)
    if set_global:
        trace.set_tracer_provider(provider)
    log.info("tracing on: exporter %s", "given" if exporter else settings.otel_exporter)
    return provider


def _exporter(kind: str) -> SpanExporter:
    if kind == "console":
        return ConsoleSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise RuntimeError(
            "LEDGERFLOW_OTEL_EXPORTER=otlp needs the OTLP exporter: pip install 'ledgerflow[otlp]'"
        ) from None
    return OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, headers... from the env


# ---------------------------------------------------------------------------- commands
def target_of(command: c.Command) -> UUID | None:
    """The aggregate a command acts on, when the request alone says which."""
    if isinstance(command, c.RunCommand):
        return command.run_id
    if isinstance(command, c.StartRun) and command.key is not None:
        return run_id_for(command.workflow, command.key)
    if isinstance(command, c.SendEvent) and command.id is not None:
        return inbound_event_id(command.id)
    if isinstance(command, c.RegisterWorkflow):
        return workflow_type_id(command.name)
    return None


@dataclass
class CommandTrace:
    """A command's span in its aggregate's trace; started on arrival when the request names
    the aggregate, else at the reply (a new run's id is known only then)."""

    name: str
    started_ns: int
    incoming: SpanContext | None
    target: UUID | None
    span: Span | None = None

    @property
    def traceparent(self) -> str | None:
        """What the events this command appends keep as their parent (see stamping)."""
        if self.span is None or not self.span.get_span_context().is_valid:
            return None
        return format_traceparent(self.span.get_span_context())

    def end(self, body: Mapping[str, JSON]) -> None:
        if self.span is None:
            found = body.get("run_id") or body.get("event_id")
            self.target = UUID(str(found)) if isinstance(found, str) else None
            self.span = self._start()
        ok = bool(body.get("ok"))
        error = body.get("error")
        outcome = "ok" if ok else str(error.get("code") if isinstance(error, dict) else "")
        self.span.set_attribute("ledgerflow.outcome", outcome)
        if self.target is not None:
            self.span.set_attribute("ledgerflow.aggregate_id", str(self.target))
        position = body.get("position")
        if isinstance(position, int):
            self.span.set_attribute("ledgerflow.position", position)
        if outcome in SERVER_ERRORS:
            self.span.set_status(Status(StatusCode.ERROR, outcome))
        self.span.end()

    def _start(self) -> Span:
        links: list[Link] = []
        if self.target is None:
            context = _context_of(self.incoming) if self.incoming is not None else Context()
        elif self.incoming is not None and self.incoming.trace_id == self.target.int:
            context = _context_of(self.incoming)  # a worker's step: its child
        else:
            # Another trace (a client's own, the API's request): linked, never the parent,
            # so that the run keeps its one trace.
            context = run_context(self.target)
            links = [Link(self.incoming)] if self.incoming is not None else []
        attributes: dict[str, str] = {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "ledgerflow.command": self.name,
        }
        if self.target is not None:
            attributes["ledgerflow.aggregate_id"] = str(self.target)
        return TRACING.tracer.start_span(
            f"command {self.name}",
            context=context,
            kind=SpanKind.SERVER,
            links=links,
            start_time=self.started_ns,
            attributes=attributes,
        )


def begin_command(name: str, command: c.Command, headers: Mapping[str, str] | None) -> CommandTrace:
    """Call only when tracing: the span of a command that just arrived."""
    incoming = parse_traceparent(headers.get("traceparent")) if headers else None
    trace_ = CommandTrace(name, time.time_ns(), incoming, target_of(command))
    if trace_.target is not None:
        trace_.span = trace_._start()
    return trace_


def _context_of(remote: SpanContext) -> Context:
    return trace.set_span_in_context(NonRecordingSpan(remote), Context())


# ------------------------------------------------------------------------------ events
def event_published(record: EventRecord, subject: str, published_ns: int) -> None:
    """Call only when tracing: the span of an event from its append to its publication.

    Its span id is the event's position, as in the ``traceparent`` header the relay puts
    on its messages, so a consumer's spans are its children. Its parent is the command that
    appended it (kept in the stored event), else the run's own span.
    """
    stamp = parse_traceparent(record.traceparent)
    aggregate = record.originator_id
    if stamp is not None and stamp.trace_id == aggregate.int:
        context = _context_of(stamp)
    else:
        context = run_context(aggregate)
    with _derived(span_id=record.position):
        span = TRACING.tracer.start_span(
            f"publish {record.qualified_type}",
            context=context,
            kind=SpanKind.PRODUCER,
            start_time=_ns(record.timestamp),
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "publish",
                "messaging.destination.name": subject,
                "ledgerflow.aggregate_id": str(aggregate),
                "ledgerflow.event_type": record.qualified_type,
                "ledgerflow.position": record.position,
            },
        )
    span.end(end_time=max(published_ns, _ns(record.timestamp)))


def run_ended(
    run_id: UUID,
    workflow: str,
    status: str,
    started_at: datetime,
    ended_at: datetime,
    position: int,
) -> None:
    """Call only when tracing: the run's own span, the root of its trace, once it ended."""
    with _derived(trace_id=run_id.int, span_id=root_span_id(run_id)):
        span = TRACING.tracer.start_span(
            f"run {workflow}",
            context=Context(),
            kind=SpanKind.INTERNAL,
            start_time=_ns(started_at),
            attributes={
                "ledgerflow.run_id": str(run_id),
                "ledgerflow.workflow": workflow,
                "ledgerflow.status": status,
                "ledgerflow.position": position,
            },
        )
    if status != "completed":
        span.set_status(Status(StatusCode.ERROR, status))
    span.end(end_time=max(_ns(ended_at), _ns(started_at)))


# -------------------------------------------------------------------------------- HTTP
@contextlib.contextmanager
def http_span(method: str, headers: Mapping[str, str]) -> Iterator[Span | None]:
    """A server span around one HTTP request (None when not tracing), continuing the
    caller's ``traceparent``; commands it forwards carry it on, to be linked to runs."""
    if not TRACING.enabled:
        yield None
        return
    remote = parse_traceparent(headers.get("traceparent"))
    context = _context_of(remote) if remote is not None else Context()
    with TRACING.tracer.start_as_current_span(
        f"HTTP {method}", context=context, kind=SpanKind.SERVER
    ) as span:
        yield span


def _ns(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000_000)
