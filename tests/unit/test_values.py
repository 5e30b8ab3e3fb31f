"""Value objects and deterministic ids: retry policy, timeouts, concurrency, names, run ids."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
from pydantic import ValidationError

from domain.errors import InvalidCommandError, InvalidPolicyError
from domain.ids import (
    child_run_id,
    inbound_event_id,
    run_id_for,
    sent_event_id,
    workflow_type_id,
)
from domain.values import (
    Concurrency,
    RetryPolicy,
    Timeouts,
    check_key,
    check_name,
    check_step_name,
)
from services.commands import RegisterWorkflow


def seconds(*values: float) -> list[timedelta]:
    return [timedelta(seconds=v) for v in values]


# --------------------------------------------------------------------------- RetryPolicy
def test_the_default_policy_tries_three_times_with_doubling_delays() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.initial_interval, policy.backoff_coefficient) == (3, 1, 2)
    assert (policy.max_interval, policy.non_retryable_error_types, policy.jitter) == (300, (), 0)


@pytest.mark.parametrize(
    "fields",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"max_attempts": 2.5},
        {"max_attempts": "3"},
        {"initial_interval": -1.0},
        {"initial_interval": math.nan},
        {"initial_interval": math.inf},
        {"initial_interval": "1"},
        {"initial_interval": True},
        {"backoff_coefficient": 0.5},
        {"backoff_coefficient": math.inf},
        {"max_interval": math.inf},
        {"initial_interval": 10.0, "max_interval": 5.0},
        {"jitter": -0.1},
        {"jitter": 1.1},
        {"jitter": math.nan},
    ],
    ids=repr,
)
def test_a_retry_policy_with_a_bad_field_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidPolicyError):
        RetryPolicy(**fields)


@pytest.mark.parametrize(
    "fields",
    [{"initial_interval": 1e15, "max_interval": 1e15}, {"max_interval": 1e15}],
    ids=["initial_interval", "max_interval"],
)
def test_an_interval_longer_than_any_due_date_can_hold_is_refused(fields: dict[str, Any]) -> None:
    # Accepted today, such a policy makes every later fail_step raise OverflowError.
    with pytest.raises(InvalidPolicyError):
        RetryPolicy(**fields)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RetryPolicy(max_attempts=True),
        lambda: Concurrency(limit=True),
    ],
    ids=["max_attempts", "concurrency_limit"],
)
def test_a_boolean_is_not_accepted_as_a_count(make: Callable[[], object]) -> None:
    # The policy's float fields already refuse booleans; its counts should too.
    with pytest.raises(InvalidPolicyError):
        make()


def test_a_policy_error_is_a_command_error_that_pydantic_reports() -> None:
    with pytest.raises(ValidationError, match="max_attempts must be an integer from 1 to 10000"):
        RegisterWorkflow(name="orders", retry_policy={"max_attempts": 0})  # type: ignore[arg-type]
    assert issubclass(InvalidPolicyError, InvalidCommandError)
    assert issubclass(InvalidPolicyError, ValueError)


def test_delays_double_from_the_initial_interval_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_interval=1.0, backoff_coefficient=2.0, max_interval=10.0)
    assert [policy.base_delay(n) for n in range(1, 7)] == seconds(1, 2, 4, 8, 10, 10)


def test_a_coefficient_of_one_gives_a_constant_delay() -> None:
    policy = RetryPolicy(initial_interval=5.0, backoff_coefficient=1.0)
    assert [policy.base_delay(n) for n in (1, 2, 50)] == seconds(5, 5, 5)


@pytest.mark.parametrize("attempt", [1_000, 1_025, 10**9])
def test_a_huge_attempt_number_gives_the_cap_without_overflowing(attempt: int) -> None:
    assert RetryPolicy(max_interval=60.0).base_delay(attempt) == timedelta(seconds=60)


@pytest.mark.parametrize("attempt", [1, 2, 1_000, 1_025, 10**9])
def test_a_zero_initial_interval_retries_at_once_whatever_the_attempt(attempt: int) -> None:
    policy = RetryPolicy(initial_interval=0.0, max_interval=60.0)
    assert policy.base_delay(attempt) == timedelta(0)


def test_attempt_numbers_start_at_one() -> None:
    with pytest.raises(InvalidCommandError):
        RetryPolicy().base_delay(0)


def test_without_jitter_the_next_delay_is_the_base_delay_whatever_rand() -> None:
    policy = RetryPolicy()
    assert [policy.next_delay(3, rand) for rand in (0.0, 0.5, 1.0)] == seconds(4, 4, 4)


def test_jitter_shortens_at_rand_zero_and_lengthens_at_rand_one() -> None:
    policy = RetryPolicy(jitter=0.5)
    assert policy.next_delay(3, rand=0.0) == timedelta(seconds=2)
    assert policy.next_delay(3, rand=0.5) == timedelta(seconds=4)
    assert policy.next_delay(3, rand=1.0) == timedelta(seconds=6)


def test_jitter_never_takes_the_delay_above_the_cap_or_below_zero() -> None:
    policy = RetryPolicy(max_interval=10.0, jitter=1.0)
    assert policy.next_delay(10, rand=1.0) == timedelta(seconds=10)
    assert policy.next_delay(10, rand=0.0) == timedelta(0)


@pytest.mark.parametrize("rand", [-0.01, 1.01, math.nan])
def test_a_rand_outside_zero_to_one_is_refused(rand: float) -> None:
    with pytest.raises(InvalidCommandError):
        RetryPolicy().next_delay(1, rand)


def test_max_attempts_counts_the_first_attempt() -> None:
    policy = RetryPolicy(max_attempts=2)
    assert [policy.allows_attempt(n) for n in (1, 2, 3)] == [True, True, False]


def test_only_listed_error_types_are_non_retryable() -> None:
    policy = RetryPolicy(non_retryable_error_types=("CardDeclined",))
    assert not policy.is_retryable("CardDeclined")
    assert policy.is_retryable("GatewayTimeout")


def test_a_retry_policy_survives_a_json_round_trip() -> None:
    policy = RetryPolicy(
        max_attempts=5,
        initial_interval=0.5,
        backoff_coefficient=3.0,
        max_interval=60.0,
        non_retryable_error_types=("CardDeclined", "Fraud"),
        jitter=0.2,
    )
    data = json.loads(json.dumps(policy.to_json()))
    assert data["non_retryable_error_types"] == ["CardDeclined", "Fraud"]
    assert RetryPolicy.from_json(data) == policy


def test_a_retry_policy_from_json_fills_in_missing_fields_with_defaults() -> None:
    assert RetryPolicy.from_json({"max_attempts": 7}) == RetryPolicy(max_attempts=7)


def test_a_list_of_error_types_is_stored_as_a_tuple() -> None:
    fields: dict[str, Any] = {"non_retryable_error_types": ["CardDeclined"]}
    assert RetryPolicy(**fields).non_retryable_error_types == ("CardDeclined",)


@pytest.mark.parametrize(
    "data",
    [{"max_attempts": 0}, {"retries": 3}, {"jitter": "lots"}],
    ids=repr,
)
def test_a_malformed_retry_policy_in_json_is_refused(data: dict[str, Any]) -> None:
    with pytest.raises(InvalidPolicyError):
        RetryPolicy.from_json(data)


# ------------------------------------------------------------------------------ Timeouts
def test_timeouts_default_to_no_limit() -> None:
    assert Timeouts() == Timeouts(run=None, step=None, heartbeat=None)


@pytest.mark.parametrize("field", ["run", "step", "heartbeat"])
@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, True, "60"])
def test_a_timeout_must_be_a_finite_positive_number(field: str, value: Any) -> None:
    with pytest.raises(InvalidPolicyError):
        Timeouts(**{field: value})


def test_timeouts_survive_a_json_round_trip() -> None:
    timeouts = Timeouts(run=3600.0, step=30.0, heartbeat=5)
    assert Timeouts.from_json(json.loads(json.dumps(timeouts.to_json()))) == timeouts


@pytest.mark.parametrize("data", [{"total": 60}, {"run": 0}], ids=repr)
def test_malformed_timeouts_in_json_are_refused(data: dict[str, Any]) -> None:
    with pytest.raises(InvalidPolicyError):
        Timeouts.from_json(data)


# --------------------------------------------------------------------------- Concurrency
def test_concurrency_is_unlimited_by_default() -> None:
    assert Concurrency() == Concurrency(limit=None, key=None)


def test_a_concurrency_limit_may_be_per_input_field() -> None:
    concurrency = Concurrency(limit=2, key="customer_id")
    assert (concurrency.limit, concurrency.key) == (2, "customer_id")


@pytest.mark.parametrize(
    "fields",
    [
        {"limit": 0},
        {"limit": -3},
        {"limit": 1.5},
        {"key": "customer_id"},
        {"limit": 2, "key": ""},
        {"limit": 2, "key": "   "},
    ],
    ids=repr,
)
def test_a_bad_concurrency_setting_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidPolicyError):
        Concurrency(**fields)


def test_concurrency_survives_a_json_round_trip() -> None:
    concurrency = Concurrency(limit=4, key="tenant")
    assert Concurrency.from_json(json.loads(json.dumps(concurrency.to_json()))) == concurrency


@pytest.mark.parametrize(
    "data",
    [{"max": 3}, {"limit": 0}, {"limit": 2, "key": 5}],
    ids=repr,
)
def test_a_malformed_concurrency_in_json_is_refused(data: dict[str, Any]) -> None:
    with pytest.raises(InvalidPolicyError):
        Concurrency.from_json(data)


# --------------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", ["orders", "_private", "shop.orders-v2", "a" * 200])
def test_a_well_formed_name_is_accepted(name: str) -> None:
    assert check_name("workflow", name) == name


@pytest.mark.parametrize(
    "name", ["", "1orders", "-orders", "has space", "slash/ed", "a" * 201, "ordérs", None]
)
def test_a_malformed_name_is_refused(name: Any) -> None:
    with pytest.raises(InvalidCommandError, match="workflow name"):
        check_name("workflow", name)


@pytest.mark.parametrize("name", ["charge card", "1", "étape", "x" * 200])
def test_step_names_are_free_text(name: str) -> None:
    assert check_step_name("step", name) == name


@pytest.mark.parametrize("name", ["", "   ", "x" * 201, None])
def test_a_blank_or_huge_step_name_is_refused(name: Any) -> None:
    with pytest.raises(InvalidCommandError):
        check_step_name("step", name)


# ----------------------------------------------------------------------------------- ids
def test_starting_the_same_workflow_with_the_same_key_lands_on_the_same_run() -> None:
    assert run_id_for("orders", "order-1") == run_id_for("orders", "order-1")


def test_a_keyed_run_id_never_changes_between_releases() -> None:
    # Pinned: a new namespace or encoding would orphan every keyed run already stored.
    assert run_id_for("orders", "order-1") == UUID("1c1bd830-7f7a-5288-aa97-9422711b46a0")
    assert workflow_type_id("orders") == UUID("34a9b9e3-2113-5713-bba3-8224d466189c")
    assert inbound_event_id("evt-1") == UUID("29ad2807-f75f-5a5b-9a7c-82aa6fb0f4cc")


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (("orders", "order-1"), ("orders", "order-2")),
        (("orders", "order-1"), ("invoices", "order-1")),
        (("a-b", "c"), ("a", "b-c")),
        (("a", '", "b'), ("a", "b")),
    ],
    ids=["other key", "other workflow", "shifted separator", "quoted key"],
)
def test_different_workflow_and_key_pairs_get_different_runs(
    one: tuple[str, str], other: tuple[str, str]
) -> None:
    assert run_id_for(*one) != run_id_for(*other)


def test_a_run_without_a_key_gets_a_fresh_random_id() -> None:
    first, second = run_id_for("orders", None), run_id_for("orders", None)
    assert first != second
    assert (first.version, second.version) == (4, 4)


def test_a_keyed_run_id_is_a_name_based_uuid() -> None:
    assert run_id_for("orders", "order-1").version == 5


def test_a_child_run_id_is_fixed_by_its_parent_and_step_name() -> None:
    parent = run_id_for("orders", "order-1")
    assert child_run_id(parent, "invoice") == child_run_id(parent, "invoice")
    assert child_run_id(parent, "invoice") != child_run_id(parent, "receipt")
    assert child_run_id(parent, "invoice") != child_run_id(run_id_for("orders", "2"), "invoice")


def test_ids_of_different_kinds_never_collide() -> None:
    ids = {
        run_id_for("orders", "x"),
        workflow_type_id("orders"),
        inbound_event_id("x"),
        child_run_id(UUID(int=0), "x"),
    }
    assert len(ids) == 4


def test_resending_an_event_with_the_same_id_lands_on_the_same_event() -> None:
    assert inbound_event_id("evt-1") == inbound_event_id("evt-1") != inbound_event_id("evt-2")


def test_an_event_without_an_id_gets_a_fresh_random_id() -> None:
    assert inbound_event_id(None) != inbound_event_id(None)


def test_an_event_a_run_sends_is_named_by_the_run_and_its_step() -> None:
    run = UUID("1c1bd830-7f7a-5288-aa97-9422711b46a0")
    assert sent_event_id(run, "announce") == f"{run}/announce"


@pytest.mark.parametrize("text", ["a\x00b", "tab\there", "line\nbreak", "\x7f"])
def test_names_and_keys_refuse_control_characters(text: str) -> None:
    with pytest.raises(InvalidCommandError, match="control characters"):
        check_step_name("step", text)
    with pytest.raises(InvalidCommandError, match="control characters"):
        check_key("key", text)
