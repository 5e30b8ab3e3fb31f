"""Read models on PostgreSQL fed through JetStream: equal to a rebuild, however fed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any
from uuid import UUID

import nats
import nats.js.errors
import pytest
from nats.js import JetStreamContext
from psycopg import sql

from domain.values import RetryPolicy
from infrastructure.bootstrap import bootstrap
from infrastructure.event_log import read_after
from infrastructure.nats.names import HEADER_MSG_ID, HEADER_POSITION, HEADER_PREV_POSITION, Names
from infrastructure.nats.streams import StreamLimits, ensure_stream, events_config
from infrastructure.postgres import read_model_schema as schema
from infrastructure.postgres.queries import InvalidQueryError, ReadModelQueries
from infrastructure.postgres.read_models import (
    RebuildInProgressError,
    apply_batch,
    apply_batches,
    catch_up,
    connect,
    init_read_models,
    open_pool,
    rebuild,
    status,
)
from infrastructure.projection_runner import LIVE_CONSUMER, ProjectionBuilder, run
from infrastructure.settings import Settings
from projections.catalog import PROJECTIONS
from projections.records import EventRecord
from services import commands as c
from services.clock import ManualClock
from services.workflow_runs import WorkflowRuns
from tests.support.isolation import isolated
from tests.support.servers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

VIEWS = {
    "ledgerflow_run_details": "run_id",
    "ledgerflow_run_counts": "workflow, status",
    "ledgerflow_workflows": "type_id",
    "ledgerflow_inbound_events": "event_id",
}
"""Every stable view, with the key that orders its rows for a row-by-row comparison."""


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def settings(postgres_server_url: str) -> Iterator[Settings]:
    """A database of this test's own (store and read models) and a subject prefix of its own."""
    with isolated(postgres_server_url) as own:
        yield own


@pytest.fixture
def app(settings: Settings) -> Iterator[WorkflowRuns]:
    service = bootstrap(settings, clock=ManualClock(), rand=lambda: 0.5)
    try:
        yield service
    finally:
        service.close()


class Stream:
    """The events stream of this test's prefix, fed as the relay would feed it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = Names(settings.subject_prefix)
        self.published = 0  # messages published: the last one's stream sequence

    def create(self) -> None:
        async def create(js: JetStreamContext) -> None:
            await ensure_stream(js, events_config(self.names, StreamLimits()))

        self._with_js(create)

    def delete(self) -> None:
        async def delete(js: JetStreamContext) -> None:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(self.names.events_stream)

        self._with_js(delete)

    def publish(self, records: list[EventRecord]) -> None:
        """Same subject, headers and body as the relay: ``EventRecord.to_json()``."""

        async def publish(js: JetStreamContext) -> None:
            for record in records:
                await self.publish_one(js, record)

        self._with_js(publish)

    async def publish_one(self, js: JetStreamContext, record: EventRecord) -> None:
        await js.publish(
            self.names.event_subject(record.aggregate, record.type),
            json.dumps(record.to_json()).encode(),
            headers={
                HEADER_MSG_ID: str(record.position),
                HEADER_POSITION: str(record.position),
                HEADER_PREV_POSITION: str(record.prev_position),
            },
        )
        self.published += 1

    def exists(self) -> bool:
        found: list[bool] = []

        async def look(js: JetStreamContext) -> None:
            try:
                await js.stream_info(self.names.events_stream)
                found.append(True)
            except nats.js.errors.NotFoundError:
                found.append(False)

        self._with_js(look)
        return found[0]

    def purge_before(self, sequence: int) -> None:
        """Purge every message before stream sequence ``sequence``."""

        async def purge(js: JetStreamContext) -> None:
            await js.purge_stream(self.names.events_stream, seq=sequence)

        self._with_js(purge)

    def _with_js(self, action: Any) -> None:
        async def main() -> None:
            async with await nats.connect(self.settings.nats_url) as nc:
                await action(nc.jetstream())

        asyncio.run(main())


@pytest.fixture
def no_stream(settings: Settings) -> Iterator[Stream]:
    """The events stream of this test's prefix, which does not exist yet (deleted after)."""
    events = Stream(settings)
    try:
        events.delete()  # reachable, and clean
    except (OSError, nats.errors.Error) as e:
        pytest.fail(f"nats-server at {settings.nats_url} is unreachable: {e}", pytrace=False)
    try:
        yield events
    finally:
        events.delete()


@pytest.fixture
def stream(no_stream: Stream) -> Stream:
    """The events stream, as the relay creates it."""
    no_stream.create()
    return no_stream


class Runner:
    """``projection_runner.run`` in a thread of its own, as ``serve --role projections``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="projections", daemon=True)

    def __enter__(self) -> Runner:
        self._thread.start()
        assert self._ready.wait(10), "the runner's loop never started"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the runner did not stop within 30 s"
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await run(self.settings, self._stop)

        try:
            asyncio.run(main())
        except BaseException as e:
            self._error = e
            self._ready.set()


def caught_up(settings: Settings, timeout: float = 30) -> None:
    def done() -> bool:
        return all(p.lag == 0 for p in status(settings) if p.state == "live")

    wait_until(done, timeout=timeout, what="every projection to reach the store's head")


def snapshot(settings: Settings) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every stable view, in key order."""
    with connect(settings) as conn:
        return {
            view: conn.execute(
                sql.SQL("SELECT * FROM {} ORDER BY {}").format(
                    sql.Identifier(settings.db_schema, view), sql.SQL(key)
                )
            ).fetchall()
            for view, key in VIEWS.items()
        }


def assert_same_rows(
    actual: dict[str, list[tuple[Any, ...]]], expected: dict[str, list[tuple[Any, ...]]]
) -> None:
    for view in VIEWS:
        assert len(actual[view]) == len(expected[view]), view
        for got, want in zip(actual[view], expected[view], strict=True):
            assert got == want, view


def live_versions(settings: Settings) -> dict[str, int]:
    return {p.name: p.version for p in status(settings) if p.state == "live"}


# --------------------------------------------------------------------------- workload
@dataclass
class Workload:
    """Runs that complete, fail and compensate, retry, sleep, wait, start children..."""

    app: WorkflowRuns
    runs: dict[str, list[UUID]] = field(default_factory=dict)
    rounds: int = 0

    def __post_init__(self) -> None:
        policy = RetryPolicy(
            max_attempts=3, initial_interval=0, non_retryable_error_types=("Fatal",)
        )
        for name, worker in (("shop", "w1"), ("invoice", "w2"), ("mail", "w1")):
            self.app.register_workflow(
                c.RegisterWorkflow(
                    name=name, triggers=[f"{name}.wanted"], retry_policy=policy, worker_id=worker
                )
            )

    def records(self, after: int = 0) -> list[EventRecord]:
        return read_after(self.app, after, 1_000_000)

    def head(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def more(self, rounds: int) -> list[EventRecord]:
        """Run ``rounds`` more rounds of every scenario; the records they appended."""
        before = self.head()
        for _ in range(rounds):
            self.rounds += 1
            for scenario in (
                self.completes,
                self.compensates,
                self.is_cancelled,
                self.is_retried,
                self.times_out,
                self.stays_in_flight,
                self.is_triggered,
            ):
                self.runs.setdefault(scenario.__name__, []).append(scenario())
        return self.records(before)

    def start(self, workflow: str = "shop") -> UUID:
        n = self.rounds
        return self.app.start_run(c.StartRun(workflow=workflow, input={"n": n})).run_id

    def step(self, run_id: UUID, name: str, attempt: int = 1, fail: str | None = None) -> None:
        self.app.start_step(c.StartStep(run_id=run_id, step=name, attempt=attempt))
        if fail is None:
            self.app.complete_step(
                c.CompleteStep(
                    run_id=run_id, step=name, attempt=attempt, output=[name], compensable=True
                )
            )
        else:
            error = c.StepError(type=fail, message=f"{name} broke")
            self.app.fail_step(c.FailStep(run_id=run_id, step=name, attempt=attempt, error=error))

    def completes(self) -> UUID:
        app, run_id = self.app, self.start()
        self.step(run_id, "charge", fail="Transient")
        self.step(run_id, "charge", attempt=2)
        app.start_sleep(c.StartSleep(run_id=run_id, name="cool-off", seconds=60))
        app.fire_timer(c.FireTimer(run_id=run_id, name="cool-off"))
        app.start_wait(
            c.StartWait(
                run_id=run_id, name="shipped", event_name="shipped", match={"n": self.rounds}
            )
        )
        event_id = app.send_event(
            c.SendEvent(name="shipped", data={"n": self.rounds}, id=f"ship-{run_id}")
        ).event_id
        app.deliver_event(c.DeliverEvent(run_id=run_id, name="shipped", event_id=event_id))
        app.start_child(c.StartChild(run_id=run_id, name="invoice", workflow="invoice", input=1))
        child_id = app.get_run(run_id).children["invoice"].run_id
        self.step(child_id, "render")
        app.complete_run(c.CompleteRun(run_id=child_id, output="INV"))
        app.resolve_child(c.ResolveChild(run_id=run_id, name="invoice"))
        app.emit_event(
            c.EmitEvent(run_id=run_id, name="announce", event_name="done", data={"ok": True})
        )
        app.complete_run(c.CompleteRun(run_id=run_id, output={"receipt": str(run_id)}))
        return run_id

    def compensates(self) -> UUID:
        run_id = self.start()
        self.step(run_id, "reserve")
        self.step(run_id, "pay", fail="Fatal")
        error = c.StepError(type="Fatal", message="card declined")
        self.app.fail_run(c.FailRun(run_id=run_id, error=error))
        self.app.compensate_step(c.CompensateStep(run_id=run_id, step="reserve"))
        return run_id

    def is_cancelled(self) -> UUID:
        run_id = self.start("mail")
        self.app.start_step(c.StartStep(run_id=run_id, step="send", attempt=1))
        self.app.cancel_run(c.CancelRun(run_id=run_id, reason="unsubscribed"))
        self.app.complete_step(c.CompleteStep(run_id=run_id, step="send", attempt=1))
        return run_id

    def is_retried(self) -> UUID:
        run_id = self.start()
        self.step(run_id, "x", fail="Fatal")
        error = c.StepError(type="Fatal", message="x broke")
        self.app.fail_run(c.FailRun(run_id=run_id, error=error))
        self.app.retry_run(c.RetryRun(run_id=run_id))
        self.step(run_id, "x", attempt=2)
        return run_id

    def times_out(self) -> UUID:
        run_id = self.start("mail")
        self.app.start_wait(c.StartWait(run_id=run_id, name="reply", event_name="reply"))
        self.app.time_out_wait(c.TimeOutWait(run_id=run_id, name="reply"))
        self.app.time_out_run(c.TimeOutRun(run_id=run_id))
        return run_id

    def stays_in_flight(self) -> UUID:
        run_id = self.start()
        kind = self.rounds % 3
        if kind == 0:
            self.app.start_sleep(c.StartSleep(run_id=run_id, name="nap", seconds=3600))
        elif kind == 1:
            self.app.start_step(c.StartStep(run_id=run_id, step="slow", attempt=1))
        return run_id

    def is_triggered(self) -> UUID:
        event_id = self.app.send_event(
            c.SendEvent(name="shop.wanted", data={"n": self.rounds})
        ).event_id
        run_id = self.start()
        inbound = self.app.get_inbound_event(event_id)
        inbound.record_triggered_run("shop", run_id)
        self.app.save(inbound)
        return run_id


# ------------------------------------------------------------------------------ tests
def test_read_models_fed_through_jetstream_equal_a_fresh_rebuild(
    settings: Settings, app: WorkflowRuns, stream: Stream
) -> None:
    workload = Workload(app)
    stream.publish(workload.more(6))
    with Runner(settings):
        caught_up(settings)
        stream.publish(workload.more(6))
        caught_up(settings)
    incremental = snapshot(settings)

    rebuild(settings)
    assert live_versions(settings) == dict.fromkeys(live_versions(settings), 2)
    assert_same_rows(snapshot(settings), incremental)

    with ReadModelQueries.connect(settings) as queries:
        statuses = {
            scenario: {queries.get_run(r).status for r in runs}  # type: ignore[union-attr]
            for scenario, runs in workload.runs.items()
        }
        assert statuses == {
            "completes": {"completed"},
            "compensates": {"failed"},
            "is_cancelled": {"cancelled"},
            "is_retried": {"running"},
            "times_out": {"failed"},
            "stays_in_flight": {"sleeping", "running", "queued"},
            "is_triggered": {"queued"},
        }
        detail = queries.get_run(workload.runs["completes"][0])
        assert detail is not None
        assert [(s.name, s.status, s.attempts) for s in detail.steps] == [
            ("charge", "completed", 2)
        ]
        assert (detail.waits[0].outcome, detail.children[0].outcome) == ("received", "completed")
        compensated = queries.get_run(workload.runs["compensates"][0])
        assert compensated is not None
        assert [s.status for s in compensated.steps] == ["compensated", "failed"]
        shop = {w.name: w for w in queries.list_workflows()}["shop"]
        runs_per_round = 5  # shop runs per round: completes, compensates, retried, ...
        assert sum(shop.runs.values()) == runs_per_round * workload.rounds
        assert shop.runs["completed"] == workload.rounds
        assert (shop.triggers, shop.workers) == (["shop.wanted"], ["w1"])
        assert queries.projection_positions() == dict.fromkeys(
            ["inbound_events", "runs", "workflows"], workload.head()
        )


def test_a_trickle_of_events_at_low_load_is_applied_in_one_transaction(
    settings: Settings, app: WorkflowRuns, stream: Stream
) -> None:
    """After a small fetch the follower lingers for more: three events published 50 ms
    apart reach the read models in one transaction, not three."""
    committed: list[list[int]] = []
    workload = Workload(app)  # its workflows are in the store: caught up from there

    async def main() -> None:
        pool = await asyncio.to_thread(open_pool, settings, 2)
        nc = await nats.connect(settings.nats_url)
        stop = asyncio.Event()
        try:
            js = nc.jetstream()
            builder = ProjectionBuilder(
                LIVE_CONSUMER,
                settings.db_schema,
                stream.names,
                js,
                pool,
                partial(read_after, app),
                projections=PROJECTIONS,
                linger=0.5,
            )
            builder.observe["runs"] = lambda records: committed.append(
                [r.position for r in records]
            )
            following = asyncio.create_task(builder.run(stop))
            while not await _has_consumer(js, stream.names.events_stream, builder.durable):
                await asyncio.sleep(0.02)
            head = workload.head()
            while [p for batch in committed for p in batch][-1:] != [head]:
                await asyncio.sleep(0.01)  # the store's records, caught up before fetching
            committed.clear()
            records = await asyncio.to_thread(workload.more, 1)
            for record in records[:3]:
                await stream.publish_one(js, record)
                await asyncio.sleep(0.05)
            deadline = time.monotonic() + 10
            while not committed and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            stop.set()
            await following
            assert committed, "nothing was applied"
            assert committed[0] == [r.position for r in records[:3]]
        finally:
            stop.set()
            await nc.close()
            await asyncio.to_thread(pool.close)

    asyncio.run(main())


async def _has_consumer(js: JetStreamContext, stream: str, durable: str) -> bool:
    try:
        await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        return False
    return True


def test_a_purged_stream_loses_nothing_the_gap_is_filled_from_the_store(
    settings: Settings, app: WorkflowRuns, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    workload = Workload(app)
    stream.publish(workload.more(3))
    with Runner(settings):
        caught_up(settings)

    unseen = workload.more(6)
    first_unseen = stream.published + 1
    stream.publish(unseen)
    stream.purge_before(first_unseen + len(unseen) // 2)  # half of what they never saw is gone
    with caplog.at_level(logging.INFO, logger="ledgerflow.projections"), Runner(settings):
        caught_up(settings)
        # and while the relay is down, the store alone feeds the projections
        workload.more(2)
        caught_up(settings)
    gaps = [r.getMessage() for r in caplog.records if "gap before" in r.getMessage()]
    assert len(gaps) == 3, gaps  # one per projection: the stream's first message after the purge
    from_store = [r for r in caplog.records if "applied from the store" in r.getMessage()]
    assert from_store
    incremental = snapshot(settings)

    rebuild(settings)
    assert_same_rows(snapshot(settings), incremental)


def test_without_a_relay_the_runner_follows_the_store_and_creates_the_stream(
    settings: Settings, app: WorkflowRuns, no_stream: Stream
) -> None:
    workload = Workload(app)
    workload.more(2)
    with Runner(settings):
        caught_up(settings)
        workload.more(1)
        caught_up(settings)
        assert no_stream.exists()
    incremental = snapshot(settings)
    rebuild(settings)
    assert_same_rows(snapshot(settings), incremental)


def test_a_batch_applies_exactly_once_whatever_its_duplicates_and_gaps(
    settings: Settings, app: WorkflowRuns
) -> None:
    records = Workload(app).more(4)

    def read(after: int, limit: int) -> list[EventRecord]:
        return read_after(app, after, limit)

    with connect(settings) as conn:
        for name in ("runs", "workflows", "inbound_events"):
            for start in range(0, len(records), 40):
                # every other record (gaps), then some already applied (redeliveries)
                batch = records[start : start + 50 : 2] + records[max(0, start - 30) : start + 5]
                result = apply_batch(conn, settings.db_schema, name, batch, read)
                assert result.position == max(r.position for r in batch)
            apply_batch(conn, settings.db_schema, name, records[-1:], read)
            assert apply_batch(conn, settings.db_schema, name, records, read).applied == 0
    incremental = snapshot(settings)
    rebuild(settings)
    assert_same_rows(snapshot(settings), incremental)


def test_lockstep_batches_apply_each_projection_once_from_its_own_position(
    settings: Settings, app: WorkflowRuns
) -> None:
    records = Workload(app).more(4)
    names = list(PROJECTIONS)

    def read(after: int, limit: int) -> list[EventRecord]:
        return read_after(app, after, limit)

    with connect(settings) as conn:
        # "runs" is ahead of the others, as after a rebuild swapped it in further on
        apply_batch(conn, settings.db_schema, "runs", records[: len(records) // 2], read)
        for start in range(0, len(records), 40):
            batch = records[start : start + 50 : 2] + records[max(0, start - 30) : start + 5]
            results = apply_batches(conn, settings.db_schema, names, batch, read)
            assert [r.name for r in results] == names
            assert min(r.position for r in results) == max(r.position for r in batch)
        results = apply_batches(conn, settings.db_schema, names, records[-1:], read)
        assert {r.position for r in results} == {records[-1].position}
        again = apply_batches(conn, settings.db_schema, names, records, read)
        assert [r.applied for r in again] == [0, 0, 0]
    incremental = snapshot(settings)
    rebuild(settings)
    assert_same_rows(snapshot(settings), incremental)


def test_a_rebuild_under_load_never_fails_a_query_and_the_runner_follows_the_swap(
    settings: Settings, app: WorkflowRuns, stream: Stream
) -> None:
    workload = Workload(app)
    stream.publish(workload.more(20))
    run_ids = [r for runs in workload.runs.values() for r in runs]
    with Runner(settings):
        caught_up(settings)
        before = snapshot(settings)
        progress: list[tuple[int, int]] = []
        with Reader(settings, run_ids) as reader:
            began = time.monotonic()
            rebuild(settings, None, lambda position, head: progress.append((position, head)))
            ended = time.monotonic()
        assert reader.errors == []
        assert reader.calls_between(began, ended) > 0
        assert progress and progress[-1][0] == progress[-1][1] == workload.head()
        assert live_versions(settings) == dict.fromkeys(live_versions(settings), 2)
        assert_same_rows(snapshot(settings), before)

        # Writers keep writing during the next rebuild: the runner follows the new version.
        writer = threading.Thread(target=workload.more, args=(6,))
        with Reader(settings, run_ids) as reader:
            writer.start()
            rebuild(settings, "runs")
            writer.join(60)
        assert reader.errors == []
        caught_up(settings)  # nothing was published (the relay is down): the store feeds it
    incremental = snapshot(settings)
    assert live_versions(settings)["runs"] == 3
    rebuild(settings)
    assert_same_rows(snapshot(settings), incremental)


class Reader:
    """A thread that keeps querying the read models, recording any failure."""

    def __init__(self, settings: Settings, run_ids: list[UUID]) -> None:
        self.queries = ReadModelQueries.connect(settings, pool_size=2)
        self.run_ids = run_ids
        self.errors: list[BaseException] = []
        self.times: list[float] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, name="reader", daemon=True)

    def __enter__(self) -> Reader:
        self._thread.start()
        wait_until(lambda: len(self.times) > 3, timeout=10, what="the reader to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(10)
        self.queries.close()

    def calls_between(self, began: float, ended: float) -> int:
        return sum(1 for t in self.times if began <= t <= ended)

    def _read(self) -> None:
        n = 0
        while not self._done.is_set():
            n += 1
            try:
                items, cursor = self.queries.list_runs(
                    limit=20, status="completed" if n % 2 else None
                )
                page, _ = self.queries.list_runs(limit=20, cursor=cursor) if cursor else ([], None)
                detail = self.queries.get_run(self.run_ids[n % len(self.run_ids)])
                assert items and detail is not None
                assert not {i.run_id for i in items} & {i.run_id for i in page}
                self.queries.list_workflows()
            except BaseException as e:  # every failure is the finding
                self.errors.append(e)
            self.times.append(time.monotonic())


def test_nul_characters_which_postgres_cannot_store_never_stall_a_projection(
    settings: Settings, app: WorkflowRuns
) -> None:
    Workload(app)
    run_id = app.start_run(c.StartRun(workflow="shop", input={"a\x00": "b\x00"}, key="k")).run_id
    app.start_step(c.StartStep(run_id=run_id, step="s", attempt=1))
    with connect(settings) as conn:
        for name in ("runs", "workflows", "inbound_events"):  # one batch per record so far
            catch_up(conn, settings.db_schema, name, partial(read_after, app), batch_size=1)
        app.complete_step(c.CompleteStep(run_id=run_id, step="s", attempt=1, output="o\x00"))
        app.cancel_run(c.CancelRun(run_id=run_id, reason="r\x00"))
        catch_up(conn, settings.db_schema, "runs", partial(read_after, app))
    with ReadModelQueries.connect(settings) as queries:
        run = queries.get_run(run_id)
    assert run is not None
    # Names and keys refuse control characters (domain.values); payloads may carry NUL.
    assert (run.key, run.input, run.cancel_reason) == ("k", {"a\ufffd": "b\ufffd"}, "r\ufffd")
    assert [(s.name, s.status, s.output) for s in run.steps] == [("s", "completed", "o\ufffd")]
    assert run.status == "cancelled"


def test_list_runs_pages_newest_first_and_filters(settings: Settings, app: WorkflowRuns) -> None:
    workload = Workload(app)
    workload.more(5)
    rebuild(settings)
    with ReadModelQueries.connect(settings) as queries:
        everything, _ = queries.list_runs(limit=500)
        assert [r.created_at for r in everything] == sorted(
            (r.created_at for r in everything), reverse=True
        )
        paged, cursor = [], None
        while True:
            items, cursor = queries.list_runs(limit=7, cursor=cursor)
            paged += items
            if cursor is None:
                break
        assert paged == everything
        failed, _ = queries.list_runs(workflow="shop", status="failed", limit=500)
        assert {r.run_id for r in failed} == set(workload.runs["compensates"])
        assert {r.error_type for r in failed} == {"Fatal"}
        middle = everything[len(everything) // 2].created_at
        newer, _ = queries.list_runs(created_after=middle, limit=500)
        older, _ = queries.list_runs(created_before=middle, limit=500)
        assert newer + older == everything
        assert queries.list_runs(created_after=middle + timedelta(days=1)) == ([], None)
        assert queries.get_run(uuid.uuid4()) is None
        assert queries.get_event(uuid.uuid4()) is None
        for bad in ({"cursor": "not a cursor"}, {"status": "asleep"}, {"limit": 0}):
            with pytest.raises(InvalidQueryError):
                queries.list_runs(**bad)
        triggered = workload.runs["is_triggered"][0]
        inbound = next(
            e
            for e in (queries.get_event(r.originator_id) for r in workload.records())
            if e is not None and e.triggered and e.triggered[0].run_id == triggered
        )
        assert (inbound.name, inbound.triggered[0].workflow) == ("shop.wanted", "shop")


def test_read_model_tables_are_created_once_and_a_second_rebuild_waits_its_turn(
    settings: Settings,
) -> None:
    init_read_models(settings)  # again: nothing changes
    assert live_versions(settings) == {"inbound_events": 1, "runs": 1, "workflows": 1}
    key = (schema.LOCK_CLASS + 1, f"{settings.db_schema}.runs")
    with connect(settings) as other:
        other.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", key)
        with pytest.raises(RebuildInProgressError):
            rebuild(settings, "runs")
    rebuild(settings, "runs")
    assert live_versions(settings) == {"inbound_events": 1, "runs": 2, "workflows": 1}
    with connect(settings) as conn:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE 'ledgerflow_run%%'"
            )
        }
    assert tables == {"ledgerflow_runs_v2", "ledgerflow_run_counts_v2"}
