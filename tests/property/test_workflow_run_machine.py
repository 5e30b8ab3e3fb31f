"""Random command sequences against WorkflowRun: the run's invariants hold after every step."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID, uuid4

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from domain.errors import DomainError
from domain.values import RetryPolicy
from domain.workflow_run import (
    ALLOWED_TRANSITIONS,
    ENDED,
    RunStatus,
    StepStatus,
    WorkflowRun,
)
from tests.property.history import make_mapper, replay, state_of

PRINTABLE = st.characters(blacklist_categories=["Cc", "Cs"])
STEPS = st.sampled_from(["charge", "reserve", "ship", "email"])
NAMES = st.sampled_from(["a", "b", "c"])
ERRORS = st.sampled_from(["Transient", "Fatal"])
OUTPUTS = st.one_of(
    st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3)
)
NOW = datetime(2026, 1, 1, tzinfo=UTC)
ENDING_ODDS = 6
POLICY = RetryPolicy(max_attempts=2, initial_interval=1, non_retryable_error_types=("Fatal",))


class WorkflowRunMachine(RuleBasedStateMachine):
    """Drives one run with random commands, checking the invariants of DESIGN.md 3 and 5."""

    def __init__(self) -> None:
        super().__init__()
        self.mapper = make_mapper()
        self.events: list[Any] = []
        self.run: WorkflowRun
        self.completed_outputs: dict[str, Any] = {}
        self.last_attempts: dict[str, int] = {}

    @initialize(key=st.one_of(st.none(), st.text(PRINTABLE, min_size=1, max_size=5)), data=OUTPUTS)
    def start(self, key: str | None, data: Any) -> None:
        self.run = WorkflowRun.start(uuid4(), "shop", data, key=key, retry_policy=POLICY)
        self.events.extend(self.run.collect_events())
        self.status = self.run.status

    # ------------------------------------------------------------------------ commands
    @rule(step=STEPS, bump=st.integers(min_value=-1, max_value=1))
    def start_step(self, step: str, bump: int) -> None:
        state = self.run.steps.get(step)
        attempt = (state.attempts if state else 0) + 1 + bump
        self.apply(lambda: self.run.start_step(step, max(attempt, 1)))

    @rule(
        step=STEPS,
        output=OUTPUTS,
        compensable=st.sampled_from([True, True, False]),
        stale=st.booleans(),
    )
    def complete_step(self, step: str, output: Any, compensable: bool, stale: bool) -> None:
        step = self._known(step)
        attempt = self._attempt(step, stale)
        self.apply(lambda: self.run.complete_step(step, attempt, output, compensable))

    @rule(step=STEPS, kind=ERRORS, retryable=st.booleans(), stale=st.booleans())
    def fail_step(self, step: str, kind: str, retryable: bool, stale: bool) -> None:
        step = self._known(step)
        attempt = self._attempt(step, stale)
        error = {"type": kind, "message": "boom"}
        self.apply(lambda: self.run.fail_step(step, attempt, error, NOW, retryable=retryable))

    @rule(name=NAMES, minutes=st.integers(min_value=0, max_value=60))
    def start_sleep(self, name: str, minutes: int) -> None:
        self.apply(lambda: self.run.start_sleep(name, NOW + timedelta(minutes=minutes)))

    @rule(name=NAMES)
    def fire_timer(self, name: str) -> None:
        self.apply(lambda: self.run.fire_timer(name))

    @rule(name=NAMES, order=st.integers(min_value=0, max_value=2))
    def start_wait(self, name: str, order: int) -> None:
        self.apply(lambda: self.run.start_wait(name, "shipment.confirmed", {"order": order}))

    @rule(name=NAMES, order=st.integers(min_value=0, max_value=2))
    def receive_event(self, name: str, order: int) -> None:
        data = {"order": order, "carrier": "ups"}
        self.apply(lambda: self.run.receive_event(name, uuid4(), "shipment.confirmed", data))

    @rule(name=NAMES)
    def time_out_wait(self, name: str) -> None:
        self.apply(lambda: self.run.time_out_wait(name))

    @rule(name=NAMES)
    def start_child(self, name: str) -> None:
        self.apply(lambda: self.run.start_child(name, uuid4(), "invoice"))

    @rule(name=NAMES, output=OUTPUTS, failed=st.booleans())
    def complete_child(self, name: str, output: Any, failed: bool) -> None:
        error = {"type": "ChildFailed", "message": "no"} if failed else None
        self.apply(lambda: self.run.complete_child(name, output, error))

    @rule(name=NAMES)
    def send_event(self, name: str) -> None:
        self.apply(lambda: self.run.send_event(name, "order.fulfilled", {"n": name}))

    @rule(step=STEPS)
    def fail_until_exhausted(self, step: str) -> None:
        """Spend a step's whole retry budget, so budgets and operator retries get tested."""
        error = {"type": "Transient", "message": "down"}
        for _ in range(POLICY.max_attempts):
            state = self.run.steps.get(step)
            attempt = (state.attempts if state else 0) + 1
            self.apply(partial(self.run.start_step, step, attempt))
            self.apply(partial(self.run.fail_step, step, attempt, error, NOW))

    @rule(step=STEPS, in_order=st.booleans())
    def compensate_step(self, step: str, in_order: bool) -> None:
        pending = self.run.compensations_pending()
        target = pending[0] if in_order and pending else step
        self.apply(lambda: self.run.compensate_step(target))

    @precondition(lambda self: self.run.status is RunStatus.COMPENSATING)
    @rule()
    def compensate_next_step(self) -> None:
        """Weights the walk towards finishing a compensation once one has started."""
        pending = self.run.compensations_pending()
        if pending:
            self.apply(lambda: self.run.compensate_step(pending[0]))

    # Ending a run is one rule that acts one time in ENDING_ODDS, so that runs live long
    # enough to reach retries, compensation and cancellation with steps in flight.
    @rule(
        how=st.sampled_from(["complete", "fail", "fatal", "time_out", "cancel"]),
        roll=st.integers(min_value=1, max_value=ENDING_ODDS),
        output=OUTPUTS,
    )
    def end(self, how: str, roll: int, output: Any) -> None:
        ending = self.run.status in ENDED or self.run.status is RunStatus.COMPENSATING
        if roll != 1 and not ending:
            return  # a live run ends rarely; an ending one is prodded every time
        commands: dict[str, Callable[[], Any]] = {
            "complete": lambda: self.run.complete(output),
            "fail": lambda: self.run.fail({"type": "Transient", "message": "workflow raised"}),
            "fatal": lambda: self.run.fail({"type": "Fatal", "message": "workflow raised"}),
            "time_out": lambda: self.run.time_out(),
            "cancel": lambda: self.run.request_cancel("customer asked"),
        }
        self.apply(commands[how])

    @rule()
    def retry(self) -> None:
        self.apply(lambda: self.run.retry(), may_reopen=True)

    # ------------------------------------------------------------------------ checking
    def apply(
        self, command: Callable[[], Any], *, may_reopen: bool = False, prodding: bool = False
    ) -> None:
        """Run one command; an error or an ended run must leave everything as it was."""
        status_before = self.run.status
        ended_before = self.run.status in ENDED
        failed_before = self.run.status is RunStatus.FAILED
        before = copy.deepcopy(state_of(self.run))
        try:
            command()
        except DomainError:
            assert self.run.collect_events() == [], "a refused command appended events"
            assert state_of(self.run) == before, "a refused command changed the run"
            return
        new_events = list(self.run.collect_events())
        if ended_before and not (may_reopen and failed_before):
            assert new_events == [], f"an ended run accepted {new_events}"
        self.events.extend(new_events)
        self.status_moves_along_the_graph()
        ending = {RunStatus.COMPENSATING, *ENDED}
        if not prodding and self.run.status in ending and status_before not in ending:
            self._prod_every_command()

    def _prod_every_command(self) -> None:
        """Aim every command at a run that is ending or has ended: each must be refused
        (changing nothing) or be a no-op, but for the few still allowed while compensating.
        Uniform rule choice alone would rarely aim a given command at such a run."""
        output = ["late"]
        error = {"type": "Transient", "message": "late"}
        commands: list[Callable[[], Any]] = [
            lambda: self.run.complete(output),
            lambda: self.run.fail(error),
            lambda: self.run.time_out(),
            lambda: self.run.request_cancel(None),
            lambda: self.run.start_sleep("late", NOW),
            lambda: self.run.start_wait("late", "shipment.confirmed"),
            lambda: self.run.start_child("late", uuid4(), "invoice"),
            lambda: self.run.send_event("late", "order.fulfilled", {}),
        ]
        for step, state in list(self.run.steps.items()):
            commands += self._step_commands(step, max(1, state.attempts), output, error)
        for name in ("a", "b", "c"):
            commands += self._named_commands(name, output)
        for command in commands:
            self.apply(command, prodding=True)
        if self.run.status is RunStatus.FAILED:
            self.apply(lambda: self.run.retry(), may_reopen=True, prodding=True)

    def _step_commands(
        self, step: str, attempt: int, output: Any, error: dict[str, Any]
    ) -> list[Callable[[], Any]]:
        return [
            lambda: self.run.start_step(step, attempt + 1),
            lambda: self.run.complete_step(step, attempt, output),
            lambda: self.run.fail_step(step, attempt, error, NOW),
        ]

    def _named_commands(self, name: str, output: Any) -> list[Callable[[], Any]]:
        return [
            lambda: self.run.fire_timer(name),
            lambda: self.run.time_out_wait(name),
            lambda: self.run.complete_child(name, output),
        ]

    def _known(self, step: str) -> str:
        """Mostly aim at a step in flight (else commands would mostly hit unknown steps)."""
        running = self.run.steps_running()
        return running[hash(step) % len(running)] if running and step != "email" else step

    def _attempt(self, step: str, stale: bool) -> int:
        state = self.run.steps.get(step)
        attempts = state.attempts if state else 1
        return max(1, attempts - 1) if stale else max(1, attempts)

    @invariant()
    def status_moves_along_the_graph(self) -> None:
        new = self.run.status
        assert new == self.status or new in ALLOWED_TRANSITIONS[self.status], (
            f"{self.status} -> {new} is not allowed"
        )
        self.status = new

    @invariant()
    def a_completed_step_never_changes(self) -> None:
        for name, state in self.run.steps.items():
            if state.status is StepStatus.COMPLETED:
                if name in self.completed_outputs:
                    assert state.output == self.completed_outputs[name]
                self.completed_outputs[name] = state.output
            elif state.status is StepStatus.COMPENSATED:
                assert name in self.completed_outputs, "only a completed step is compensated"
            else:
                # Leaving 'completed' is allowed only through compensation then retry.
                assert name not in self.completed_outputs or self._retried_since(name)
                self.completed_outputs.pop(name, None)

    @invariant()
    def attempts_never_decrease_nor_exceed_the_policy(self) -> None:
        for name, state in self.run.steps.items():
            assert state.attempts >= self.last_attempts.get(name, 0)
            assert state.attempts - state.attempts_base <= POLICY.max_attempts
            self.last_attempts[name] = state.attempts

    @invariant()
    def a_retried_run_can_run_its_failed_steps_again(self) -> None:
        for name, state in self.run.steps.items():
            if state.status is StepStatus.PENDING and self.run.status is RunStatus.QUEUED:
                trial = copy.deepcopy(self.run)
                trial.start_step(name, state.attempts + 1)  # raises if the budget is spent

    @invariant()
    def replaying_the_stored_events_gives_the_live_state(self) -> None:
        replayed = replay(self.events, self.mapper)
        assert replayed is not None
        assert state_of(replayed) == state_of(self.run)

    @invariant()
    def versions_are_gapless(self) -> None:
        versions = [e.originator_version for e in self.events]
        assert versions == list(range(1, len(versions) + 1))
        assert all(isinstance(e.originator_id, UUID) for e in self.events)

    def _retried_since(self, step: str) -> bool:
        return any(isinstance(e, WorkflowRun.RunRetried) for e in self.events)


WorkflowRunMachine.TestCase.settings = settings(settings.default, stateful_step_count=40)
TestWorkflowRun = WorkflowRunMachine.TestCase
