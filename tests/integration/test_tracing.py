"""Tracing on real PostgreSQL and nats-server: one trace per run, and nothing when off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import nats
import pytest
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from infrastructure import projection_runner
from infrastructure.event_log import read_after
from infrastructure.http.app import create_app
from infrastructure.nats.names import Names
from infrastructure.settings import Settings
from infrastructure.telemetry.tracing import configure_tracing
from ledgerflow._telemetry import TRACING, root_span_id
from tests.integration import worker_flows
from tests.integration.durable_stack import stack
from tests.support import waiting
from tests.support.isolation import isolated

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DEADLINE = 30.0
TODAYS_EVENT_HEADERS = {
    "Nats-Msg-Id",
    "Ledgerflow-Position",
    "Ledgerflow-Prev-Position",
    "Ledgerflow-Originator-Id",
    "Ledgerflow-Version",
    "Ledgerflow-Type",
    "traceparent",
    "Nats-Expected-Last-Msg-Id",  # the relay's ordering guard, on all but a resync's first
    "Nats-Expected-Last-Sequence",
}
"""The headers the relay put on its messages before tracing existed."""


@pytest.fixture
def settings(postgres_server_url: str) -> Iterator[Settings]:
    with isolated(postgres_server_url) as own:
        yield own


@pytest.fixture
def exporter(settings: Settings) -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = configure_tracing(settings, role="test", exporter=spans)
    assert provider is not None and TRACING.enabled
    try:
        yield spans
    finally:
        TRACING.disable()
        provider.shutdown()


@asynccontextmanager
async def projections(settings: Settings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    role = asyncio.create_task(projection_runner.run(settings, stop), name="projections")
    try:
        yield
    finally:
        stop.set()
        await role


@asynccontextmanager
async def listening(settings: Settings, *subjects: str) -> AsyncIterator[list[Msg]]:
    """Every message published on ``subjects`` while inside (JetStream's included)."""
    heard: list[Msg] = []

    async def keep(msg: Msg) -> None:
        heard.append(msg)

    nc = await nats.connect(settings.nats_url)
    try:
        for subject in subjects:
            await nc.subscribe(subject, cb=keep)
        await nc.flush()
        yield heard
    finally:
        await nc.close()


def of_run(spans: tuple[ReadableSpan, ...], run_id: str) -> list[ReadableSpan]:
    return [s for s in spans if s.context is not None and s.context.trace_id == UUID(run_id).int]


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def one(spans: list[ReadableSpan], name: str, **attributes: Any) -> ReadableSpan:
    found = [
        s
        for s in named(spans, name)
        if all((s.attributes or {}).get(f"ledgerflow.{k}") == v for k, v in attributes.items())
    ]
    assert len(found) == 1, f"{name} {attributes}: {[s.attributes for s in named(spans, name)]}"
    return found[0]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def attribute(span: ReadableSpan, name: str) -> Any:
    return (span.attributes or {}).get(f"ledgerflow.{name}")


def test_a_runs_commands_events_and_steps_join_the_trace_its_run_id_names(
    settings: Settings, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    names = Names(settings.subject_prefix)
    app_tracer = TracerProvider().get_tracer("the client's own app")

    async def scenario() -> tuple[str, list[Msg]]:
        async with (
            listening(settings, names.events_wildcard, names.task(">")) as heard,
            stack(settings, worker_flows.flow) as running,
            projections(settings),
        ):
            with app_tracer.start_as_current_span("place order") as client_span:
                run_id = await running.client.start("flaky", {"log": str(tmp_path / "log")})
            assert await running.client.result(run_id, DEADLINE) == "ok"

            async def root_span_exported() -> bool:
                return bool(named(of_run(exporter.get_finished_spans(), run_id), "run flaky"))

            await waiting.until(root_span_exported, "the run's own span", DEADLINE)
            start = one(of_run(exporter.get_finished_spans(), run_id), "command start_run")
            client = client_span.get_span_context()
            linked = [(link.context.trace_id, link.context.span_id) for link in start.links]
            assert linked == [(client.trace_id, client.span_id)]  # linked, not its parent
            return run_id, heard

    run_id, heard = asyncio.run(scenario())
    spans = of_run(exporter.get_finished_spans(), run_id)
    trace_id = UUID(run_id).int

    # The run's own span is the root, with the id its run id gives it.
    root = one(spans, "run flaky", status="completed")
    assert root.parent is None and span_id(root) == root_span_id(run_id)
    assert root.context is not None and root.context.trace_id == trace_id

    # Commands, events and steps are all in the run's trace.
    for name in ("command start_step", "command fail_step", "command complete_step"):
        assert named(spans, name), name
    for kind in ("RunStarted", "TaskDispatched", "StepFailed", "StepCompleted", "RunCompleted"):
        assert named(spans, f"publish WorkflowRun.{kind}"), kind
    attempts = sorted(named(spans, "step call"), key=lambda s: int(attribute(s, "attempt")))
    assert [attribute(s, "outcome") for s in attempts] == [
        "failed",
        "failed",
        "completed",
    ]
    assert not [
        s
        for s in exporter.get_finished_spans()
        if s.context is not None
        and (s.attributes or {}).get("ledgerflow.run_id") == run_id
        and s.context.trace_id != trace_id
    ]

    # One causal chain: task message -> worker task -> step -> command -> event.
    last = attempts[-1]
    task = next(s for s in named(spans, "ledgerflow.task") if span_id(s) == parent_id(last))
    assert task.kind is SpanKind.CONSUMER
    dispatched = next(s for s in spans if span_id(s) == parent_id(task))
    assert dispatched.name == "publish WorkflowRun.TaskDispatched"
    assert span_id(dispatched) == (dispatched.attributes or {})["ledgerflow.position"]
    complete = next(
        s for s in named(spans, "command complete_step") if parent_id(s) == span_id(last)
    )
    completed = one(spans, "publish WorkflowRun.StepCompleted")
    assert parent_id(completed) == span_id(complete)
    started = one(spans, "publish WorkflowRun.RunStarted")
    assert parent_id(started) == root_span_id(run_id)  # a start without a key: see ADR 11

    # The relay's messages name the event's span in their traceparent.
    ours = [m for m in heard if (m.headers or {}).get("Ledgerflow-Originator-Id") == run_id]
    assert ours and any(m.subject.startswith(f"{settings.subject_prefix}.task.") for m in ours)
    for message in ours:
        headers = message.headers or {}
        position = int(headers["Ledgerflow-Position"])
        assert headers["traceparent"] == f"00-{UUID(run_id).hex}-{position:016x}-01"


def test_with_tracing_off_there_are_no_spans_and_no_new_headers_or_stored_keys(
    settings: Settings, tmp_path: Path
) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    assert not TRACING.enabled
    TRACING.tracer = provider.get_tracer("would record anything unguarded")  # still disabled
    names = Names(settings.subject_prefix)

    async def scenario() -> tuple[str, list[Msg]]:
        async with (
            listening(
                settings, names.events_wildcard, names.task(">"), names.commands_wildcard
            ) as heard,
            stack(settings, worker_flows.flow) as running,
            projections(settings),
        ):
            run_id = await running.client.start("flaky", {"log": str(tmp_path / "log")})
            assert await running.client.result(run_id, DEADLINE) == "ok"
            records = await asyncio.to_thread(read_after, running.store, 0, 10_000)
            assert records and all(r.traceparent is None for r in records)
            stored = await running.history(run_id)
            assert all("_traceparent" not in vars(event) for event in stored)
            return run_id, heard

    try:
        run_id, heard = asyncio.run(scenario())
    finally:
        TRACING.disable()
        provider.shutdown()
    assert spans.get_finished_spans() == ()
    commands = [m for m in heard if m.subject.startswith(f"{settings.subject_prefix}.cmd.")]
    assert commands and all(not m.headers for m in commands)
    published = [m for m in heard if not m.subject.startswith(f"{settings.subject_prefix}.cmd.")]
    assert any(m.subject.startswith(f"{settings.subject_prefix}.task.") for m in published)
    for message in published:
        assert set(message.headers or {}) <= TODAYS_EVENT_HEADERS, message.subject
    assert run_id


def test_an_http_command_carries_the_callers_trace_on_to_the_command_service(
    settings: Settings, exporter: InMemorySpanExporter
) -> None:
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    names = Names(settings.subject_prefix)

    async def scenario() -> dict[str, str]:
        forwarded: list[dict[str, str]] = []
        nc = await nats.connect(settings.nats_url)

        async def command_service(msg: Msg) -> None:  # answers as the real one would
            forwarded.append(dict(msg.headers or {}))
            await msg.respond(b'{"ok": true, "position": 1}')

        app = create_app(settings)
        try:
            await nc.subscribe(names.command("cancel_run"), cb=command_service)
            await nc.flush()
            async with (
                app.router.lifespan_context(app),
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://ledgerflow"
                ) as http,
            ):
                body = {"run_id": "8876b3f9-0244-47d5-98b3-592b03833430"}
                reply = await http.post(
                    "/commands/cancel_run", json=body, headers={"traceparent": caller}
                )
                assert reply.status_code == 200, reply.text
        finally:
            await nc.close()
        (headers,) = forwarded
        return headers

    headers = asyncio.run(scenario())
    (request,) = named(list(exporter.get_finished_spans()), "POST /commands/{name}")
    assert request.kind is SpanKind.SERVER
    assert request.context is not None and request.parent is not None
    assert (request.context.trace_id, request.parent.span_id) == (
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
    )
    assert (request.attributes or {})["http.response.status_code"] == 200
    assert (
        headers["traceparent"] == f"00-0af7651916cd43dd8448eb211c80319c-{span_id(request):016x}-01"
    )
