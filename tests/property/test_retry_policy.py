"""RetryPolicy under hypothesis: delays grow to the cap, stay >= 0, jitter within bounds."""

from __future__ import annotations

import os

from hypothesis import example, given
from hypothesis import strategies as st

from domain.values import MAX_SECONDS, RetryPolicy
from tests.property.test_workflow_run_machine import TestWorkflowRun


@st.composite
def policies(draw: st.DrawFn) -> RetryPolicy:
    initial = draw(st.floats(min_value=0, max_value=3600, allow_nan=False))
    cap = draw(st.floats(min_value=initial, max_value=MAX_SECONDS, allow_nan=False))
    return RetryPolicy(
        max_attempts=draw(st.integers(min_value=1, max_value=50)),
        initial_interval=initial,
        backoff_coefficient=draw(st.floats(min_value=1, max_value=100, allow_nan=False)),
        max_interval=cap,
        jitter=draw(st.floats(min_value=0, max_value=1, allow_nan=False)),
    )


ATTEMPTS = st.integers(min_value=1, max_value=5000)
RANDS = st.floats(min_value=0, max_value=1, allow_nan=False)


@given(policies(), ATTEMPTS)
def test_base_delays_never_decrease_and_never_pass_the_cap(policy: RetryPolicy, n: int) -> None:
    now, later = policy.base_delay(n), policy.base_delay(n + 1)
    assert now <= later
    assert later.total_seconds() <= policy.max_interval


@given(policies(), ATTEMPTS, RANDS)
def test_a_delay_is_never_negative_nor_above_the_cap(policy: RetryPolicy, n: int, r: float) -> None:
    seconds = policy.next_delay(n, r).total_seconds()
    assert 0 <= seconds <= policy.max_interval


@given(policies(), ATTEMPTS, RANDS)
@example(  # the base's rounding alone was once past a one-microsecond slack
    RetryPolicy(
        initial_interval=0.928056818681787,
        max_interval=2.0,
        jitter=0.9375,
        max_attempts=1,
        backoff_coefficient=1.0,
    ),
    1,
    1.0,
)
def test_jitter_stays_within_its_fraction_of_the_base_delay(
    policy: RetryPolicy, n: int, r: float
) -> None:
    base = policy.base_delay(n).total_seconds()
    seconds = policy.next_delay(n, r).total_seconds()
    # timedelta keeps microseconds only: the delay is rounded once, and the base it is
    # compared with was rounded too, an error that jitter scales by up to 2.
    slack = 2e-6 * max(1.0, base)
    assert base * (1 - policy.jitter) - slack <= seconds
    assert seconds <= min(policy.max_interval, base * (1 + policy.jitter)) + slack


@given(policies(), ATTEMPTS)
def test_without_jitter_the_delay_is_the_base_delay(policy: RetryPolicy, n: int) -> None:
    assert policy.next_delay(n, 0.5) == policy.base_delay(n)


@given(policies())
def test_a_policy_survives_its_json_form(policy: RetryPolicy) -> None:
    assert RetryPolicy.from_json(policy.to_json()) == policy


def test_ci_runs_the_state_machine_at_least_200_times() -> None:
    if os.environ.get("CI"):
        assert TestWorkflowRun.settings.max_examples >= 200
