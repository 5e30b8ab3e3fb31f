"""The command service's aggregate cache: never stale, never holding what was not committed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.persistence import OperationalError

from domain.errors import DomainError, InvalidStateError
from domain.ids import run_id_for
from domain.workflow_run import RunStatus, StepStatus, WorkflowRun
from infrastructure.bootstrap import bootstrap
from infrastructure.settings import Settings
from services import commands as c
from services import workflow_runs
from services.aggregate_cache import AggregateCache
from services.workflow_runs import RunLoaded, WorkflowRuns

RUN = run_id_for("orders", "o-1")


@pytest.fixture
def store(tmp_path: Path) -> Settings:
    """One event store (a SQLite file) that several service instances can share."""
    return Settings(database_url=f"sqlite:///{tmp_path}/store.db")


@pytest.fixture
def app(store: Settings) -> Iterator[WorkflowRuns]:
    service = bootstrap(store, create_tables=True)
    service.register_workflow(c.RegisterWorkflow(name="orders"))
    service.start_run(c.StartRun(workflow="orders", key="o-1"))
    try:
        yield service
    finally:
        service.close()


def loaded(app: WorkflowRuns) -> dict[str, Any]:
    """The run as a worker's ``load_run`` sees it (through the cache)."""
    reply = app.handle(c.LoadRun(run_id=RUN))
    assert isinstance(reply, RunLoaded)
    return reply.run


def test_a_command_sees_what_another_instance_wrote_after_its_cached_version(
    app: WorkflowRuns, store: Settings
) -> None:
    app.start_step(c.StartStep(run_id=RUN, step="charge", attempt=1))  # cached
    version = app.get_run(RUN).version
    other = bootstrap(store)
    try:
        other.complete_step(c.CompleteStep(run_id=RUN, step="charge", attempt=1, output=7))
        other.start_step(c.StartStep(run_id=RUN, step="ship", attempt=1))
    finally:
        other.close()
    assert RUN in app.cache
    app.complete_step(c.CompleteStep(run_id=RUN, step="ship", attempt=1, output=8))
    run = app.get_run(RUN)  # read from the store alone
    assert run.version == version + 3  # decided again on the store's state: nothing lost
    assert {name: s.output for name, s in run.steps.items()} == {"charge": 7, "ship": 8}
    assert loaded(app)["steps"]["charge"]["status"] == "completed"


def test_a_step_command_alone_is_decided_on_its_cached_run_and_again_after_a_conflict(
    app: WorkflowRuns, store: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRUSTING: no read of the store before deciding; the insert's version check catches
    a run another instance moved on, and the command is decided again on the store's."""
    app.start_step(c.StartStep(run_id=RUN, step="charge", attempt=1))
    other = bootstrap(store)
    try:
        other.complete_step(c.CompleteStep(run_id=RUN, step="charge", attempt=1, output=7))
    finally:
        other.close()
    inserts: list[str] = []
    insert = app.recorder.insert_events

    def counted(*args: Any, **kwargs: Any) -> Any:
        try:
            result = insert(*args, **kwargs)
        except Exception as e:
            inserts.append(type(e).__name__)
            raise
        inserts.append("ok")
        return result

    monkeypatch.setattr(app.recorder, "insert_events", counted)
    app.complete_step(c.CompleteStep(run_id=RUN, step="charge", attempt=1, output=8))
    # Refused by the version check; decided again on the store's state, where the
    # step has completed already: the first outcome stands and nothing is appended.
    assert inserts == ["IntegrityError"]
    assert app.get_run(RUN).steps["charge"].output == 7
    assert loaded(app)["steps"]["charge"]["output"] == 7
    app.start_step(c.StartStep(run_id=RUN, step="ship", attempt=1))
    assert inserts == ["IntegrityError", "ok"]  # cached as stored now


def test_a_completion_and_the_next_start_in_one_batch_are_decided_on_the_cached_run(
    app: WorkflowRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small batch of step commands trusts the cache as one command alone does: the
    store is not read before the decision, only written."""
    app.start_step(c.StartStep(run_id=RUN, step="charge", attempt=1))  # cached

    def no_read(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the store was read")

    monkeypatch.setattr(app.recorder, "select_events", no_read)
    monkeypatch.setattr(app, "catch_up", no_read)
    results = app.execute(
        [
            c.CompleteStep(run_id=RUN, step="charge", attempt=1, output=7),
            c.StartStep(run_id=RUN, step="ship", attempt=1),
        ]
    )
    assert not any(isinstance(r, DomainError) for r in results)
    monkeypatch.undo()
    run = app.get_run(RUN)
    assert run.steps["charge"].output == 7
    assert run.steps["ship"].status is StepStatus.RUNNING


def test_a_trusted_batch_on_a_stale_run_is_decided_again_on_the_stores(
    app: WorkflowRuns, store: Settings
) -> None:
    """Another instance moved the run on: the save's version check refuses the trusted
    batch, and both commands are decided again on the store's state."""
    app.start_step(c.StartStep(run_id=RUN, step="charge", attempt=1))  # cached
    other = bootstrap(store)
    try:
        other.complete_step(c.CompleteStep(run_id=RUN, step="charge", attempt=1, output=7))
    finally:
        other.close()
    results = app.execute(
        [
            c.CompleteStep(run_id=RUN, step="charge", attempt=1, output=8),
            c.StartStep(run_id=RUN, step="ship", attempt=1),
        ]
    )
    assert not any(isinstance(r, DomainError) for r in results)
    run = app.get_run(RUN)
    assert run.steps["charge"].output == 7  # the first outcome stands
    assert run.steps["ship"].status is StepStatus.RUNNING
    assert loaded(app)["steps"]["ship"]["status"] == "running"


def test_a_refusal_in_a_trusted_batch_refuses_that_command_alone(app: WorkflowRuns) -> None:
    """One command of the batch is refused on the cached run: the batch is decided again
    on the store's state, where the other command is applied and the refusal stands."""
    app.start_step(c.StartStep(run_id=RUN, step="charge", attempt=1))  # cached
    results = app.execute(
        [
            c.CompleteStep(run_id=RUN, step="charge", attempt=1, output=7),
            c.StartStep(run_id=RUN, step="ship", attempt=3),  # skips attempts: refused
        ]
    )
    assert not isinstance(results[0], DomainError)
    assert isinstance(results[1], DomainError)
    run = app.get_run(RUN)
    assert run.steps["charge"].output == 7
    assert "ship" not in run.steps
    assert loaded(app)["steps"]["charge"]["status"] == "completed"


def test_a_refusal_on_a_stale_cached_run_is_decided_again_on_the_stores(
    app: WorkflowRuns, store: Settings
) -> None:
    app.start_step(c.StartStep(run_id=RUN, step="charge", attempt=1))  # cached
    other = bootstrap(store)
    try:
        other.start_step(c.StartStep(run_id=RUN, step="ship", attempt=1))
    finally:
        other.close()
    # The cached run has no step "ship": refused there, applied on the store's state.
    app.complete_step(c.CompleteStep(run_id=RUN, step="ship", attempt=1, output=1))
    assert app.get_run(RUN).steps["ship"].status is StepStatus.COMPLETED


def test_a_batch_whose_save_fails_leaves_nothing_of_its_decisions_in_the_cache(
    app: WorkflowRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    app.start_step(c.StartStep(run_id=RUN, step="charge", attempt=1))

    def down(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("the store went away")

    with monkeypatch.context() as patch:
        patch.setattr(app.recorder, "insert_events", down)
        with pytest.raises(OperationalError):
            app.complete_step(c.CompleteStep(run_id=RUN, step="charge", attempt=1, output=1))
    assert RUN not in app.cache
    assert loaded(app)["steps"]["charge"]["status"] == "running"  # as stored
    app.complete_step(c.CompleteStep(run_id=RUN, step="charge", attempt=1, output=2))
    assert app.get_run(RUN).steps["charge"].output == 2


def test_a_refused_decision_that_changed_its_run_is_not_cached(
    app: WorkflowRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The domain refuses before it changes anything; if a decision ever broke that rule,
    neither its batch's save nor the cache may keep the change."""
    app.start_step(c.StartStep(run_id=RUN, step="charge", attempt=1))
    version = app.get_run(RUN).version

    def complete_then_refuse(app: WorkflowRuns, uow: Any, cmd: c.CompleteStep) -> Any:
        uow.get(cmd.run_id, WorkflowRun).complete_step(cmd.step, cmd.attempt, 1)
        raise InvalidStateError("refused after changing the run")

    handlers = dict(workflow_runs._HANDLERS)
    handlers[c.CompleteStep] = (complete_then_refuse, workflow_runs.Applied)
    monkeypatch.setattr(workflow_runs, "_HANDLERS", handlers)
    results = app.execute(
        [
            c.CompleteStep(run_id=RUN, step="charge", attempt=1),  # poisons the batch
            c.CancelRun(run_id=run_id_for("orders", "missing")),
        ]
    )
    assert isinstance(results[0], InvalidStateError)
    monkeypatch.undo()
    run = loaded(app)
    assert run["steps"]["charge"]["status"] == StepStatus.RUNNING
    assert run["version"] == version


def test_a_refused_command_leaves_the_cached_run_usable(app: WorkflowRuns) -> None:
    app.start_step(c.StartStep(run_id=RUN, step="charge", attempt=1))
    with pytest.raises(InvalidStateError):
        app.retry_run(c.RetryRun(run_id=RUN))  # only a failed run retries
    assert RUN in app.cache
    app.cancel_run(c.CancelRun(run_id=RUN))
    assert app.get_run(RUN).status is RunStatus.RUNNING  # cancel waits for the step
    assert loaded(app)["cancel_requested"] is True


def test_the_cache_keeps_the_most_recently_used_aggregates_and_the_newest_version(
    app: WorkflowRuns,
) -> None:
    cache = AggregateCache(maxsize=1)
    first, second = app.get_run(RUN), app.get_workflow_type("orders")
    cache.put([first, second])
    assert RUN not in cache and second.id in cache and len(cache) == 1
    newer = app.get_workflow_type("orders")
    newer.add_worker("w-1")
    with pytest.raises(ValueError, match="uncommitted"):
        cache.put([newer])
    app.save(newer)
    cache.put([newer])
    cache.put([second])  # an older version coming back late
    taken = cache.take(second.id)
    assert taken is newer
    assert cache.take(second.id) is None  # taken: the taker owns it until it puts it back
