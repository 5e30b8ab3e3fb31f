"""Durable command_id deduplication and group commit on the real PostgreSQL store."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from domain.errors import RunNotFoundError
from domain.ids import run_id_for
from infrastructure.bootstrap import bootstrap
from infrastructure.postgres.schema import PostgresParams
from infrastructure.settings import Settings
from services import commands as c
from services import workflow_runs
from services.workflow_runs import Reply, RunStartedReply, WorkflowRuns

pytestmark = pytest.mark.integration


@pytest.fixture
def apps(database_settings: Settings) -> Iterator[tuple[WorkflowRuns, WorkflowRuns]]:
    """Two service instances on one store, as two command-service processes would be."""
    first, second = bootstrap(database_settings), bootstrap(database_settings)
    first.register_workflow(c.RegisterWorkflow(name="orders"))
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def commands_logged(settings: Settings, command_id: str) -> list[tuple[str, int]]:
    with psycopg.connect(PostgresParams.from_url(settings.database_url).conninfo()) as conn:
        rows = conn.execute(
            "SELECT name, position FROM ledgerflow_commands WHERE command_id = %s", (command_id,)
        ).fetchall()
    return [(str(name), int(position)) for name, position in rows]


def test_a_retried_command_returns_its_first_reply_from_the_store(
    apps: tuple[WorkflowRuns, WorkflowRuns], database_settings: Settings
) -> None:
    first_app, second_app = apps
    command = c.StartRun(workflow="orders", input={"n": 1}, command_id="client-7/req-1")
    first = first_app.handle(command)
    head = first_app.recorder.max_notification_id()
    again = second_app.handle(command)  # another instance: only the store remembers
    assert again == first
    assert first_app.recorder.max_notification_id() == head
    assert commands_logged(database_settings, "client-7/req-1") == [("start_run", first.position)]


def test_instances_racing_on_one_command_id_apply_it_once(
    apps: tuple[WorkflowRuns, WorkflowRuns],
) -> None:
    first_app, second_app = apps
    command = c.StartRun(workflow="orders", command_id="racy")
    head = first_app.recorder.max_notification_id() or 0
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(
            pool.map(lambda n: (first_app, second_app)[n % 2].handle(command), range(16))
        )
    assert len({r.model_dump_json() for r in replies}) == 1
    # One run: its RunStarted and the TaskDispatched of its start (ADR 13).
    assert (first_app.recorder.max_notification_id() or 0) == head + 2


def test_a_batch_is_one_transaction_that_logs_every_command_with_its_position(
    apps: tuple[WorkflowRuns, WorkflowRuns], database_settings: Settings
) -> None:
    app, _ = apps
    batch: list[c.Command] = [
        c.StartRun(workflow="orders", key=f"o-{n}", command_id=f"b-{n}") for n in range(20)
    ]
    batch.insert(5, c.CancelRun(run_id=run_id_for("orders", "missing"), command_id="b-bad"))
    results = app.execute(batch)
    assert isinstance(results[5], RunNotFoundError)
    started = [r for r in results if isinstance(r, RunStartedReply)]
    assert [r.position for r in started] == sorted(r.position for r in started)
    # One contiguous insert: each start is a RunStarted and a TaskDispatched (ADR 13).
    assert started[-1].position - started[0].position == 19 * 2
    for n, reply in enumerate(started):
        assert commands_logged(database_settings, f"b-{n}") == [("start_run", reply.position)]
    assert commands_logged(database_settings, "b-bad") == []


def test_a_batch_whose_commands_all_repeat_appends_nothing(
    apps: tuple[WorkflowRuns, WorkflowRuns],
) -> None:
    app, other = apps
    batch = [c.StartRun(workflow="orders", command_id=f"r-{n}") for n in range(5)]
    first: list[Reply | Exception] = list(app.execute(batch))
    head = app.recorder.max_notification_id()
    assert list(other.execute(batch)) == first
    assert app.recorder.max_notification_id() == head


def test_a_cached_run_is_brought_up_to_date_with_what_another_instance_wrote(
    apps: tuple[WorkflowRuns, WorkflowRuns],
) -> None:
    first_app, second_app = apps
    run_id = first_app.start_run(c.StartRun(workflow="orders", key="cached")).run_id
    first_app.start_step(c.StartStep(run_id=run_id, step="charge", attempt=1))
    assert run_id in first_app.cache
    second_app.complete_step(c.CompleteStep(run_id=run_id, step="charge", attempt=1, output=1))
    second_app.start_step(c.StartStep(run_id=run_id, step="ship", attempt=1))
    first_app.complete_step(c.CompleteStep(run_id=run_id, step="ship", attempt=1, output=2))
    run = second_app.get_run(run_id)
    assert run.version == 6  # started and dispatched, then 4 step events
    assert {name: s.output for name, s in run.steps.items()} == {"charge": 1, "ship": 2}


def test_a_batch_brings_its_cached_runs_up_to_date_in_one_query(
    apps: tuple[WorkflowRuns, WorkflowRuns], monkeypatch: pytest.MonkeyPatch
) -> None:
    first_app, second_app = apps
    keys = [f"bulk-{n}" for n in range(3)]
    ids = [first_app.start_run(c.StartRun(workflow="orders", key=k)).run_id for k in keys]
    for run_id in ids:
        first_app.start_step(c.StartStep(run_id=run_id, step="charge", attempt=1))
    second_app.complete_step(c.CompleteStep(run_id=ids[1], step="charge", attempt=1, output=1))
    queries: list[int] = []
    recorder = first_app.recorder
    select = recorder.select_events_after  # type: ignore[attr-defined]

    def counted(versions: list[tuple[Any, int]]) -> Any:
        queries.append(len(versions))
        return select(versions)

    monkeypatch.setattr(recorder, "select_events_after", counted)
    # Decided on the store's state, as a batch larger than TRUSTING_BATCH is.
    monkeypatch.setattr(workflow_runs, "TRUSTING_BATCH", 0)
    batch = [c.CompleteStep(run_id=i, step="charge", attempt=1, output=7) for i in ids]
    assert all(isinstance(r, Reply) for r in first_app.execute(batch))
    assert queries == [3]  # one catch-up for the batch, not one per run
    outputs = [second_app.get_run(i).steps["charge"].output for i in ids]
    assert outputs == [7, 1, 7]  # the other instance's outcome was seen, and stands
