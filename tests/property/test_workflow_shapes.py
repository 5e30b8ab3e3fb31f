"""Random workflow shapes run end to end on the real stack end as a tiny model says they do."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from unittest.mock import ANY

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infrastructure.settings import Settings
from ledgerflow import Flow, NonRetryableError, RetryPolicy, RunContext
from services.clock import ManualClock
from tests.integration.durable_stack import DEADLINE, ENDED, Stack, everything, kinds
from tests.support import waiting
from tests.support.isolation import isolated

pytestmark = pytest.mark.integration

# Each example drives a run through real servers (about a second for a long shape), so the
# profiles' counts (60 dev, 300 CI) would take minutes: a fixed, smaller budget instead.
PROFILE_EXAMPLES = settings().max_examples  # the loaded profile's
EXAMPLES = min(PROFILE_EXAMPLES, 25 if PROFILE_EXAMPLES >= 300 else 15)
SLEEP = timedelta(minutes=10)
WAIT_TIMEOUT = timedelta(hours=1)
RETRY = RetryPolicy(max_attempts=3, initial_interval=1, max_interval=1)

Kind = Literal["ok", "flaky", "fatal", "sleep", "wait"]


@dataclass(frozen=True)
class Segment:
    kind: Kind
    fails: int = 0  # flaky: attempts that fail before one succeeds
    delivered: bool = False  # wait: the event comes (else the wait times out)


segments = st.one_of(
    st.just(Segment("ok")),
    st.integers(0, 2).map(lambda k: Segment("flaky", fails=k)),
    st.just(Segment("fatal")),
    st.just(Segment("sleep")),
    st.booleans().map(lambda delivered: Segment("wait", delivered=delivered)),
)
shapes = st.lists(segments, min_size=1, max_size=6)

flow = Flow("shapes")
CALLS: Counter[tuple[str, str]] = Counter()  # (shape id, step) -> attempts made


def attempt(shape: str, step: str, kind: str, fails: int) -> str:
    CALLS[shape, step] += 1
    if kind == "fatal":
        raise NonRetryableError(f"{step} cannot succeed")
    if CALLS[shape, step] <= fails:
        raise ConnectionError(f"{step} attempt {CALLS[shape, step]} failed")
    return f"{step}:done"


@flow.workflow(retry=RetryPolicy(max_attempts=1))  # only the flaky steps' own policy retries
async def shape(ctx: RunContext, spec: dict[str, Any]) -> list[str | None]:
    results: list[str | None] = []
    for i, segment in enumerate(spec["segments"]):
        name, kind = f"s{i}", segment["kind"]
        if kind in ("ok", "flaky", "fatal"):
            policy = RETRY if kind == "flaky" else None
            args = (spec["id"], name, kind, segment["fails"])
            results.append(await ctx.step(name, attempt, *args, retry=policy))
        elif kind == "sleep":
            await ctx.sleep(name, SLEEP)
            results.append(None)
        else:
            match = {"shape": spec["id"], "wait": name}
            data = await ctx.wait_for_event(name, "shape.go", match=match, timeout=WAIT_TIMEOUT)
            results.append(None if data is None else str(data["value"]))
    return results


# --------------------------------------------------------------------------------- model
@dataclass
class Expected:
    status: str = "completed"
    output: list[str | None] | None = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    history: list[str] = field(default_factory=lambda: ["RunStarted"])


def model(segments: list[Segment]) -> Expected:
    """What the run must do: status, output, attempts per step, history (hand-offs aside)."""
    expected = Expected()
    assert expected.output is not None
    for i, segment in enumerate(segments):
        name = f"s{i}"
        if segment.kind == "sleep":
            expected.history += ["SleepStarted", "TimerFired"]
            expected.output.append(None)
        elif segment.kind == "wait":
            outcome = "EventReceived" if segment.delivered else "WaitTimedOut"
            expected.history += ["WaitStarted", outcome]
            expected.output.append(f"{name}:got" if segment.delivered else None)
        else:
            expected.history += ["StepStarted", "StepFailed", "RetryScheduled"] * segment.fails
            expected.history.append("StepStarted")
            expected.calls[name] = segment.fails + 1
            if segment.kind == "fatal":
                expected.history += ["StepFailed", "RunFailed"]
                return Expected("failed", None, expected.calls, expected.history)
            expected.history.append("StepCompleted")
            expected.output.append(f"{name}:done")
    expected.history.append("RunCompleted")
    return expected


# -------------------------------------------------------------------------------- driver
async def drive(stack: Stack, run_id: str, spec: dict[str, Any], segments: list[Segment]) -> None:
    """Play the world: move time for sleeps, retries and timeouts; send awaited events."""
    done: set[str] = set()

    async def ended() -> bool:
        run = await stack.client.get(run_id)
        if run["status"] in ENDED:
            return True
        for name, sleep in run["sleeps"].items():
            if not sleep["fired"] and name not in done:
                done.add(name)
                stack.clock.advance(SLEEP + timedelta(minutes=1))
        for name, wait in run["waits"].items():
            if wait["outcome"] == "pending" and name not in done:
                done.add(name)
                if segments[int(name[1:])].delivered:
                    data = {"shape": spec["id"], "wait": name, "value": f"{name}:got"}
                    await stack.client.send_event("shape.go", data)
                else:
                    stack.clock.advance(WAIT_TIMEOUT + timedelta(minutes=1))
        for name, step in run["steps"].items():
            retry = f"{name}#{step['attempts']}"
            if step["status"] == "retrying" and retry not in done:
                done.add(retry)
                stack.clock.advance(timedelta(seconds=2))
        return False

    await waiting.until(ended, f"the end of shape {segments}", DEADLINE)


async def check(stack: Stack, segments: list[Segment]) -> None:
    spec = {"id": uuid.uuid4().hex, "segments": [vars(s) for s in segments]}
    expected = model(segments)
    run_id = await stack.client.start(shape, spec)
    await drive(stack, run_id, spec, segments)

    run = await stack.client.get(run_id)
    assert run["status"] == expected.status
    assert run["output"] == expected.output
    if expected.status == "failed":
        fatal = next(i for i, s in enumerate(segments) if s.kind == "fatal")
        assert run["error"] == {
            "type": "StepFailedError",
            "message": f"step 's{fatal}' failed: NonRetryableError: s{fatal} cannot succeed",
            "traceback": ANY,
        }
    calls = {step: n for (shape_id, step), n in CALLS.items() if shape_id == spec["id"]}
    assert calls == expected.calls
    attempts = {step: state["attempts"] for step, state in run["steps"].items()}
    assert attempts == expected.calls
    assert kinds(await stack.history(run_id)) == expected.history


# --------------------------------------------------------------------------------- test
@pytest.fixture
def own_settings(postgres_server_url: str) -> Iterator[Settings]:
    with isolated(postgres_server_url) as own:
        yield own


def test_random_workflow_shapes_end_as_the_model_says(own_settings: Settings) -> None:
    clock = ManualClock(datetime.now(tz=UTC))

    async def scenario() -> None:
        async with everything(own_settings, clock, flow) as stack:
            loop = asyncio.get_running_loop()

            # Hypothesis drives examples synchronously: from a thread, each on this loop.
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            )
            @given(shapes)
            def each_shape(segments: list[Segment]) -> None:
                future = asyncio.run_coroutine_threadsafe(check(stack, segments), loop)
                future.result(timeout=2 * DEADLINE)

            await asyncio.to_thread(each_shape)

    asyncio.run(scenario())
