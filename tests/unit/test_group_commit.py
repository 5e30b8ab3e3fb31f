"""Group commit: many commands, one save, each command isolated, each command_id applied once."""

from __future__ import annotations

from typing import Any

import pytest

from domain.errors import RunNotFoundError, StepNotFoundError
from domain.ids import run_id_for
from services import commands as c
from services.workflow_runs import Applied, RunStartedReply
from tests.unit.scenario import Scenario

RUN = run_id_for("orders", "o-1")


def registered() -> Scenario:
    return Scenario().given(c.RegisterWorkflow(name="orders"))


def test_a_batch_applies_every_good_command_and_refuses_only_the_bad_one() -> None:
    s = registered()
    head = s.head()
    results = s.app.execute(
        [
            c.StartRun(workflow="orders", key="o-1"),
            c.StartStep(run_id=RUN, step="charge", attempt=1),
            c.CompleteStep(run_id=RUN, step="ship", attempt=1),  # never started
            c.CompleteStep(run_id=RUN, step="charge", attempt=1, output=42),
        ]
    )
    assert isinstance(results[0], RunStartedReply)
    assert isinstance(results[2], StepNotFoundError)
    assert [type(e).__name__ for e in s.events_after(head)] == [
        "RunStarted",
        "TaskDispatched",
        "StepStarted",
        "StepCompleted",
    ]
    assert s.run(RUN).steps["charge"].output == 42


def test_each_reply_carries_the_position_of_that_commands_last_event() -> None:
    s = registered()
    results = s.app.execute(
        [
            c.StartRun(workflow="orders", key="o-1"),
            c.StartRun(workflow="orders", key="o-2"),
            c.StartStep(run_id=RUN, step="charge", attempt=1),
        ]
    )
    positions = {n.originator_id: n.id for n in s.app.recorder.select_notifications(1, 10)}
    assert [r.position for r in results if isinstance(r, Applied | RunStartedReply)] == [
        positions[RUN] - 1,  # RunStarted of o-1 (its StepStarted comes right after)
        positions[run_id_for("orders", "o-2")],
        positions[RUN],
    ]


def test_a_repeated_command_id_gets_the_first_reply_and_changes_nothing() -> None:
    s = registered()
    command = c.StartRun(workflow="orders", command_id="req-1")  # no key: a new run each time
    first = s.app.handle(command)
    head = s.head()
    again = s.app.handle(command)
    assert again == first
    assert s.head() == head


def test_a_command_id_repeated_within_one_batch_is_applied_once() -> None:
    s = registered()
    command = c.StartRun(workflow="orders", command_id="req-2")
    first, second = s.app.execute([command, command])
    assert first == second
    assert [type(e).__name__ for e in s.events_after(1)] == ["RunStarted", "TaskDispatched"]


def test_a_refused_command_id_is_not_remembered() -> None:
    s = registered()
    command = c.CancelRun(run_id=RUN, command_id="req-3")
    assert isinstance(s.app.execute([command])[0], RunNotFoundError)
    s.given(c.StartRun(workflow="orders", key="o-1"))
    s.when(command).then_events(["CancelRequested", "RunCancelled"])


def test_commands_on_one_run_in_one_batch_apply_in_order() -> None:
    s = registered().given(c.StartRun(workflow="orders", key="o-1"))
    results = s.app.execute(
        [c.StartStep(run_id=RUN, step=f"s{n}", attempt=1) for n in range(50)]
        + [c.CompleteStep(run_id=RUN, step=f"s{n}", attempt=1, output=n) for n in range(50)]
    )
    assert all(isinstance(r, Applied) for r in results)
    run = s.run(RUN)
    assert [run.steps[f"s{n}"].output for n in range(50)] == list(range(50))
    assert run.version == 102  # RunStarted, TaskDispatched, then the 100


def test_a_refusal_on_a_run_the_batch_had_not_loaded_yet_keeps_the_batch_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = registered().given(c.StartRun(workflow="orders", key="o-1"))
    saves: list[int] = []
    save = s.app.save

    def counted(*aggregates: Any, **kwargs: Any) -> Any:
        saves.append(len(aggregates))
        return save(*aggregates, **kwargs)

    monkeypatch.setattr(s.app, "save", counted)
    results = s.app.execute(
        [
            c.RetryRun(run_id=RUN),  # loads the run, and is refused: it has not failed
            c.StartRun(workflow="orders", key="o-2"),
            c.StartStep(run_id=RUN, step="charge", attempt=1),
        ]
    )
    assert [type(r).__name__ for r in results] == [
        "InvalidStateError",
        "RunStartedReply",
        "Applied",
    ]
    assert saves == [2]  # one save for both runs, not one per command
