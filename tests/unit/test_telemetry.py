"""Telemetry without servers: log lines, trace ids, stamped events, run counters, the guard."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from prometheus_client import REGISTRY

from infrastructure.settings import Settings
from infrastructure.telemetry.logs import configure_logging
from infrastructure.telemetry.runs import RunCounter
from infrastructure.telemetry.tracing import http_span, target_of
from ledgerflow._telemetry import (
    TRACING,
    format_traceparent,
    log_context,
    outgoing_headers,
    parent_in_run,
    parse_traceparent,
    root_span_id,
    step_attempt,
    task_scope,
    trace_id_of,
)
from services import commands as c
from tests.support.records import record

RUN = UUID("0b5c6f4e-8a83-4d8e-9b0a-3f7f2c1d9e11")
TRACEPARENT = f"00-{RUN.hex}-00000000000000aa-01"


# ------------------------------------------------------------------------------- logs
@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger's lines, as configure_logging would write them (JSON)."""
    root = logging.getLogger()
    level = root.level
    out = io.StringIO()
    handler = configure_logging("DEBUG", "json", role="worker", stream=out)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_carry_the_run_and_position_of_the_work_in_hand(captured: io.StringIO) -> None:
    log = logging.getLogger("ledgerflow.worker")
    log.info("idle")
    with log_context(RUN, 42):
        log.info("run %s: replaying", "x")
        with log_context(position=43):
            log.warning("nested", extra={"step": "charge"})
    log.info("about one record", extra={"run_id": "given", "position": 7})

    idle, replaying, nested, given = lines(captured)
    assert idle["message"] == "idle" and "run_id" not in idle and "position" not in idle
    assert idle["logger"] == "ledgerflow.worker" and idle["role"] == "worker"
    assert idle["level"] == "info" and datetime.fromisoformat(idle["ts"]).tzinfo is not None
    assert (replaying["run_id"], replaying["position"]) == (str(RUN), 42)
    assert replaying["message"] == "run x: replaying"
    assert (nested["run_id"], nested["position"], nested["step"]) == (str(RUN), 43, "charge")
    assert (given["run_id"], given["position"]) == ("given", 7)


def test_an_exception_stays_inside_its_one_json_line(captured: io.StringIO) -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logging.getLogger("ledgerflow.relay").exception("failed")
    (line,) = lines(captured)
    assert line["message"] == "failed"
    assert "ValueError: boom" in line["exception"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_text_on_a_terminal_and_json_elsewhere() -> None:
    root = logging.getLogger()
    level = root.level
    terminal, pipe = Terminal(), io.StringIO()
    try:
        configure_logging("INFO", "auto", role="serve", stream=terminal)
        with log_context(RUN, 5):
            logging.getLogger("ledgerflow.commands").info("hello")
        handler = configure_logging("INFO", "auto", role="serve", stream=pipe)  # replaces it
        logging.getLogger("ledgerflow.commands").info("again")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    text = terminal.getvalue()
    assert "INFO ledgerflow.commands [serve]: hello" in text
    assert f"run_id={RUN} position=5" in text
    assert "again" not in text  # one handler of ours at a time
    assert json.loads(pipe.getvalue())["message"] == "again"


# ---------------------------------------------------------------------------- tracing
def test_a_runs_trace_and_root_span_are_derived_from_its_id() -> None:
    assert trace_id_of(RUN) == RUN.int == trace_id_of(str(RUN))
    assert root_span_id(RUN) == root_span_id(str(RUN)) != 0
    assert root_span_id(uuid4()) != root_span_id(RUN)


def test_traceparent_round_trips_and_nonsense_is_ignored() -> None:
    context = parse_traceparent(TRACEPARENT)
    assert context is not None and context.trace_id == RUN.int and context.span_id == 0xAA
    assert format_traceparent(context) == TRACEPARENT
    for bad in (None, "", "00-zz-11-01", f"00-{'0' * 32}-00000000000000aa-01", "ff-1-2-3"):
        assert parse_traceparent(bad) is None


def test_a_worker_continues_from_the_task_only_within_the_runs_trace() -> None:
    from opentelemetry import trace

    own = trace.get_current_span(parent_in_run(RUN, TRACEPARENT)).get_span_context()
    assert (own.trace_id, own.span_id) == (RUN.int, 0xAA)
    foreign = f"00-{uuid4().hex}-00000000000000aa-01"
    fallback = trace.get_current_span(parent_in_run(RUN, foreign)).get_span_context()
    assert (fallback.trace_id, fallback.span_id) == (RUN.int, root_span_id(RUN))


def test_a_commands_target_is_known_from_the_request_where_it_can_be() -> None:
    assert target_of(c.CancelRun(run_id=RUN)) == RUN
    keyed = target_of(c.StartRun(workflow="w", key="k"))
    assert keyed is not None and keyed == target_of(c.StartRun(workflow="w", key="k"))
    assert target_of(c.StartRun(workflow="w")) is None  # a new run's id comes with the reply
    assert target_of(c.SendEvent(name="e")) is None


class Exploding:
    """A tracer that fails the test if anything calls it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"tracing is off, yet the tracer's {name} was called")


def test_with_tracing_off_nothing_touches_the_tracer() -> None:
    assert not TRACING.enabled
    saved = TRACING.tracer
    TRACING.tracer = Exploding()  # type: ignore[assignment]
    try:
        with task_scope(str(RUN), 3, TRACEPARENT), step_attempt(str(RUN), "w", "s", 1) as attempt:
            attempt.begin()
            attempt.end("completed")
            assert outgoing_headers() is None
        with http_span("GET", {"traceparent": TRACEPARENT}) as span:
            assert span is None
    finally:
        TRACING.tracer = saved


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_step_attempt_is_timed_and_counted_by_outcome() -> None:
    labels = {"workflow": "unit-metrics", "step": "charge"}
    before = sample("ledgerflow_step_duration_seconds_count", **labels)
    with step_attempt(str(RUN), "unit-metrics", "charge", 1) as attempt:
        attempt.begin()
        attempt.end("failed")
    with step_attempt(str(RUN), "unit-metrics", "charge", 2) as attempt:
        pass  # refused before it began: not an attempt
    with (
        pytest.raises(asyncio.CancelledError),
        step_attempt(str(RUN), "unit-metrics", "charge", 3) as a,
    ):
        a.begin()
        raise asyncio.CancelledError  # the worker stopping mid-attempt
    assert sample("ledgerflow_step_duration_seconds_count", **labels) == before + 2
    assert sample("ledgerflow_step_attempts_total", outcome="failed", **labels) == 1
    assert sample("ledgerflow_step_attempts_total", outcome="interrupted", **labels) == 1


# ----------------------------------------------------------------------- run counters
def test_runs_are_counted_by_workflow_from_the_records_applied() -> None:
    seen, other = uuid4(), uuid4()
    asked: list[set[UUID]] = []

    def lookup(run_ids: Any) -> dict[UUID, tuple[str, datetime]]:
        asked.append(set(run_ids))
        return {other: ("unit-b", datetime(2026, 1, 1, tzinfo=UTC))}

    counter = RunCounter(lookup)
    before = {
        "started": sample("ledgerflow_runs_started_total", workflow="unit-a"),
        "completed": sample("ledgerflow_runs_ended_total", workflow="unit-a", status="completed"),
        "failed": sample("ledgerflow_runs_ended_total", workflow="unit-b", status="failed"),
    }
    counter.observe(
        [record("RunStarted", seen, 1, workflow="unit-a"), record("StepStarted", seen, 2)]
    )
    counter.observe([record("RunCompleted", seen, 3), record("RunTimedOut", other, 4)])
    counter.observe([record("RunRetried", other, 5), record("RunFailed", other, 6)])
    assert asked == [{other}]  # the start seen is remembered; the other run read once
    assert sample("ledgerflow_runs_started_total", workflow="unit-a") == before["started"] + 1
    assert (
        sample("ledgerflow_runs_ended_total", workflow="unit-a", status="completed")
        == before["completed"] + 1
    )
    assert sample("ledgerflow_runs_ended_total", workflow="unit-b", status="timed_out") == 1
    assert (
        sample("ledgerflow_runs_ended_total", workflow="unit-b", status="failed")
        == before["failed"] + 1
    )
    assert sample("ledgerflow_runs_retried_total", workflow="unit-b") == 1


def test_telemetry_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Settings().metrics_port, Settings().otel_exporter, Settings().log_format) == (
        None,
        "none",
        "auto",
    )
    monkeypatch.setenv("LEDGERFLOW_METRICS_PORT", "9464")
    monkeypatch.setenv("LEDGERFLOW_OTEL_EXPORTER", "otlp")
    monkeypatch.setenv("LEDGERFLOW_LOG_FORMAT", "json")
    settings = Settings()
    assert (settings.metrics_port, settings.metrics_host) == (9464, "127.0.0.1")
    assert (settings.otel_exporter, settings.log_format) == ("otlp", "json")
    monkeypatch.setenv("LEDGERFLOW_OTEL_EXPORTER", "zipkin")
    with pytest.raises(ValueError):
        Settings()
