"""WorkflowRuns on the real PostgreSQL event store: save, load, conflicts, atomic saves."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError, StoredEvent
from eventsourcing.utils import get_topic

from domain.ids import run_id_for
from domain.inbound_event import InboundEvent
from domain.workflow_run import RunStatus, StepStatus, WorkflowRun
from infrastructure.bootstrap import bootstrap, init_database
from infrastructure.postgres.recorder import CommandLoggingRecorder
from infrastructure.postgres.schema import PostgresParams, drop_database
from infrastructure.settings import Settings
from services import commands as c
from services.clock import ManualClock
from services.workflow_runs import WorkflowRuns
from tests.property.history import state_of

pytestmark = pytest.mark.integration


@pytest.fixture
def app(database_settings: Settings) -> Iterator[WorkflowRuns]:
    service = bootstrap(database_settings, clock=ManualClock())
    try:
        yield service
    finally:
        service.close()


@pytest.fixture
def other_app(database_settings: Settings) -> Iterator[WorkflowRuns]:
    """A second service instance on the same store: another process, in effect."""
    service = bootstrap(database_settings)
    try:
        yield service
    finally:
        service.close()


def started_run(app: WorkflowRuns, workflow: str = "shop") -> uuid.UUID:
    app.register_workflow(c.RegisterWorkflow(name=workflow, triggers=["order.placed"]))
    return app.start_run(c.StartRun(workflow=workflow, input={"order": 1})).run_id


def test_a_run_saved_by_one_service_loads_identically_in_another(
    app: WorkflowRuns, other_app: WorkflowRuns
) -> None:
    run_id = started_run(app)
    app.start_step(c.StartStep(run_id=run_id, step="charge", attempt=1))
    app.fail_step(
        c.FailStep(
            run_id=run_id,
            step="charge",
            attempt=1,
            error=c.StepError(type="Timeout", message="slow"),
        )
    )
    app.start_step(c.StartStep(run_id=run_id, step="charge", attempt=2))
    app.complete_step(
        c.CompleteStep(
            run_id=run_id, step="charge", attempt=2, output={"id": "ch_1"}, compensable=True
        )
    )
    app.start_sleep(c.StartSleep(run_id=run_id, name="cool-off", seconds=600))
    app.fire_timer(c.FireTimer(run_id=run_id, name="cool-off"))
    position = app.complete_run(c.CompleteRun(run_id=run_id, output={"done": True})).position

    live = app.get_run(run_id)
    loaded = other_app.get_run(run_id)
    assert state_of(loaded) == state_of(live)
    assert loaded.status is RunStatus.COMPLETED
    assert loaded.steps["charge"].status is StepStatus.COMPLETED
    assert loaded.steps["charge"].attempts == 2
    assert position == other_app.recorder.max_notification_id()


def test_two_writers_deciding_on_the_same_version_conflict_and_the_second_saves_nothing(
    app: WorkflowRuns, other_app: WorkflowRuns
) -> None:
    run_id = started_run(app)
    first, second = app.get_run(run_id), other_app.get_run(run_id)
    first.start_step("charge", 1)
    second.start_sleep("nap", app.clock.now() + timedelta(minutes=1))
    app.save(first)
    with pytest.raises(IntegrityError):
        other_app.save(second)
    reloaded = other_app.get_run(run_id)
    assert list(reloaded.steps) == ["charge"]
    assert reloaded.sleeps == {}


def test_a_handler_that_loses_a_race_reloads_and_decides_again(
    app: WorkflowRuns, other_app: WorkflowRuns
) -> None:
    run_id = started_run(app)
    started_at = app.get_run(run_id).version
    workers = 8
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(
            pool.map(
                lambda n: (app if n % 2 else other_app).start_step(
                    c.StartStep(run_id=run_id, step=f"step-{n}", attempt=1)
                ),
                range(workers),
            )
        )
    run = app.get_run(run_id)
    assert sorted(run.steps) == sorted(f"step-{n}" for n in range(workers))
    assert run.version == started_at + workers


def test_concurrent_starts_with_the_same_key_make_exactly_one_run(
    app: WorkflowRuns, other_app: WorkflowRuns
) -> None:
    app.register_workflow(c.RegisterWorkflow(name="checkout"))
    command = c.StartRun(workflow="checkout", input={"cart": 9}, key="cart-9")
    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(
            pool.map(lambda n: (app if n % 2 else other_app).start_run(command), range(40))
        )
    assert {r.run_id for r in replies} == {run_id_for("checkout", "cart-9")}
    assert sum(r.created for r in replies) == 1
    # One start: RunStarted and its TaskDispatched (ADR 13), nothing more.
    assert app.get_run(run_id_for("checkout", "cart-9")).version == 2


def test_a_multi_aggregate_save_is_all_or_nothing(app: WorkflowRuns) -> None:
    run_id = started_run(app)
    taken = InboundEvent.receive(uuid.uuid4(), "order.placed", {"order": 1})
    app.save(taken)
    head = app.recorder.max_notification_id()

    run = app.get_run(run_id)
    run.start_step("charge", 1)
    clash = InboundEvent.receive(taken.id, "order.placed", {"order": 2})  # version 1 again
    with pytest.raises(IntegrityError):
        app.save(run, clash)

    assert app.recorder.max_notification_id() == head
    assert app.get_run(run_id).steps == {}


def test_emitting_an_event_saves_the_run_and_the_event_in_one_transaction(
    app: WorkflowRuns,
) -> None:
    run_id = started_run(app)
    reply = app.emit_event(
        c.EmitEvent(run_id=run_id, name="announce", event_name="order.fulfilled", data={"n": 1})
    )
    run, inbound = app.get_run(run_id), app.get_inbound_event(reply.event_id)
    assert run.sent_events == {"announce": reply.event_id}
    assert (inbound.name, inbound.sent_by_run) == ("order.fulfilled", run_id)
    positions = [
        n.id
        for n in app.recorder.select_notifications(start=reply.position - 1, limit=2)
        if n.originator_id in (run_id, reply.event_id)
    ]
    assert positions == [reply.position - 1, reply.position]


def test_a_version_1_step_failure_in_the_store_is_upcast_when_loaded(app: WorkflowRuns) -> None:
    """StepFailed v1 (before structured errors) stored {"error": str, "error_type": str}."""
    run_id = started_run(app)
    app.start_step(c.StartStep(run_id=run_id, step="charge", attempt=1))
    next_version = app.get_run(run_id).version + 1
    v1_state = {
        # As eventsourcing's transcoder stored it: the session's later readers decode it.
        "timestamp": {"_type_": "datetime_iso", "_data_": "2025-06-01T12:00:00+00:00"},
        "step": "charge",
        "attempt": 1,
        "error": "card declined",
        "error_type": "CardDeclined",
    }
    app.recorder.insert_events(
        [
            StoredEvent(
                originator_id=run_id,
                originator_version=next_version,
                topic=get_topic(WorkflowRun.StepFailed),
                state=json.dumps(v1_state).encode(),
            )
        ]
    )
    run = app.get_run(run_id)
    assert run.steps["charge"].error == {"type": "CardDeclined", "message": "card declined"}
    assert run.steps["charge"].status is StepStatus.FAILED


def test_db_init_creates_the_database_and_tables_and_is_idempotent(
    postgres_server_url: str,
) -> None:
    params = PostgresParams.from_url(postgres_server_url)
    url = params.url(f"ledgerflow_init_{uuid.uuid4().hex[:8]}")
    cli = [sys.executable, "-m", "ledgerflow", "-o", "json", "--database-url", url, "db", "init"]
    try:
        first = subprocess.run(cli, capture_output=True, text=True, timeout=120, check=True)
        second = subprocess.run(cli, capture_output=True, text=True, timeout=120, check=True)
        assert json.loads(first.stdout)["created"] is True
        assert json.loads(second.stdout)["created"] is False
        with psycopg.connect(url) as conn:
            tables = {
                row[0]
                for row in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
            }
        assert "ledgerflow_events" in tables
    finally:
        drop_database(url)


def test_db_init_against_an_unreachable_server_says_which_url_failed() -> None:
    url = "postgresql://postgres@127.0.0.1:1/nowhere"
    cli = [sys.executable, "-m", "ledgerflow", "-o", "json", "--database-url", url, "db", "init"]
    result = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 3
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "unavailable"
    assert "127.0.0.1:1" in error["message"]


def test_the_service_does_not_create_tables_lazily(postgres_server_url: str) -> None:
    params = PostgresParams.from_url(postgres_server_url)
    url = params.url(f"ledgerflow_bare_{uuid.uuid4().hex[:8]}")
    with psycopg.connect(params.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{PostgresParams.from_url(url).dbname}"')
    try:
        service = bootstrap(Settings(database_url=url))
        try:
            with pytest.raises(Exception, match="ledgerflow_events"):
                service.register_workflow(c.RegisterWorkflow(name="shop"))
        finally:
            service.close()
    finally:
        drop_database(url)


# ---------------------------------------------------- the one-statement insert (ADR 18)
def _events_table(app: WorkflowRuns) -> str:
    recorder = app.recorder
    assert isinstance(recorder, CommandLoggingRecorder)
    return f'"{recorder.datastore.schema}"."{recorder.events_table_name}"'


def test_an_insert_waits_for_an_earlier_uncommitted_insert_so_commit_order_is_insert_order(
    app: WorkflowRuns, database_settings: Settings
) -> None:
    """Without the table lock, the second insert would take the next notification id and
    commit first: a reader at that moment would pass over the gap for good."""
    run_id = started_run(app)
    table = _events_table(app)
    with psycopg.connect(database_settings.database_url) as earlier:
        row = earlier.execute(
            f"INSERT INTO {table} (originator_id, originator_version, topic, state)"
            " VALUES (%s, 1, 'x', '\\x7b7d') RETURNING notification_id",
            (uuid.uuid4(),),
        ).fetchone()
        assert row is not None
        with ThreadPoolExecutor(max_workers=1) as pool:
            saving = pool.submit(
                app.start_step, c.StartStep(run_id=run_id, step="charge", attempt=1)
            )
            deadline = time.monotonic() + 15
            while not _waits_for_lock(earlier, table):
                assert not saving.done(), "the insert did not wait for the earlier one"
                assert time.monotonic() < deadline, "the insert never asked for the lock"
                time.sleep(0.01)
            earlier.commit()
            position = saving.result(timeout=15).position
        # The session's store is shared: no undecodable event is left for later readers.
        earlier.execute(f"DELETE FROM {table} WHERE notification_id = %s", (row[0],))
    assert position == row[0] + 1


def _waits_for_lock(conn: psycopg.Connection[tuple[object, ...]], table: str) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass",
        (table,),
    ).fetchone()
    return bool(row and row[0])


def test_an_insert_notifies_the_relay_channel(
    app: WorkflowRuns, database_settings: Settings
) -> None:
    recorder = app.recorder
    assert isinstance(recorder, CommandLoggingRecorder)
    with psycopg.connect(database_settings.database_url, autocommit=True) as listener:
        listener.execute(f'LISTEN "{recorder.channel_name}"')
        started_run(app)
        heard = list(listener.notifies(timeout=10, stop_after=1))
    assert [n.channel for n in heard] == [recorder.channel_name]


def test_a_database_without_the_insert_function_falls_back_to_eventsourcings_insert(
    postgres_server_url: str,
) -> None:
    """A store that `ledgerflow db init` has not upgraded yet still takes every write."""
    params = PostgresParams.from_url(postgres_server_url)
    settings = Settings(database_url=params.url(f"ledgerflow_old_{uuid.uuid4().hex[:8]}"))
    init_database(settings)
    try:
        service = bootstrap(settings)
        recorder = service.recorder
        assert isinstance(recorder, CommandLoggingRecorder)
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(
                f'DROP FUNCTION "{recorder.datastore.schema}"."{recorder.insert_function_name}"'
            )
        try:
            run_id = started_run(service)
            service.start_step(c.StartStep(run_id=run_id, step="charge", attempt=1))
            assert list(service.get_run(run_id).steps) == ["charge"]
            assert recorder.uses_insert_function is False
        finally:
            service.close()
    finally:
        drop_database(settings.database_url)


def test_the_log_read_as_plain_rows_makes_the_records_eventsourcings_reader_makes(
    app: WorkflowRuns,
) -> None:
    """``read_after`` reads PostgreSQL's log as plain rows (relay, rebuilds); the records
    are those of eventsourcing's own reader and domain events, gaps and odd values too."""
    from infrastructure.event_log import read_after
    from projections.records import record_of

    run_id = started_run(app, "plain-rows")
    start = app.recorder.max_notification_id() or 0
    app.start_step(c.StartStep(run_id=run_id, step="a", attempt=1))
    odd = {"id": str(uuid.uuid4()), "big": 2**70, "_type_": "x", "nested": [{"_data_": 1}]}
    app.complete_step(c.CompleteStep(run_id=run_id, step="a", attempt=1, output=odd))
    with pytest.raises(IntegrityError):  # rolled back: its position is skipped for good
        app.recorder.insert_events(
            [StoredEvent(run_id, 1, get_topic(WorkflowRun.StepFailed), b"{}")]
        )
    app.complete_run(c.CompleteRun(run_id=run_id, output={"at": "2026-11-25T03:00:00+00:00"}))
    ours = read_after(app, start, 100)
    theirs = []
    prev = start
    for n in app.recorder.select_notifications(start=start, limit=100, inclusive_of_start=False):
        theirs.append(record_of(app.mapper.to_domain_event(n), n.id, prev))
        prev = n.id
    assert ours == theirs
    assert len(ours) == 3
    assert ours[-1].position - ours[-2].position == 2  # the gap, chained over
    assert ours[-1].prev_position == ours[-2].position
