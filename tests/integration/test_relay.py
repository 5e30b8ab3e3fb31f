"""The relay puts the store on JetStream in order, exactly once, across crashes and takeovers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import psycopg
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy
from nats.js.errors import NotFoundError

from domain.values import Concurrency
from domain.workflow_run import WorkflowRun
from infrastructure.bootstrap import bootstrap, init_database
from infrastructure.event_log import head, read_after
from infrastructure.nats import names as h
from infrastructure.nats.connect import NatsUnavailableError, connect
from infrastructure.nats.names import Names, traceparent
from infrastructure.nats.relay import Relay
from infrastructure.nats.streams import StreamLimits, delete_streams, ensure_streams
from infrastructure.postgres.schema import PostgresParams, drop_database
from infrastructure.settings import Settings
from projections.records import EventRecord
from services import commands as c
from services.workflow_runs import WorkflowRuns
from tests.support import waiting
from tests.support.isolation import isolated
from tests.support.servers import MissingBinaryError, PrivateNats, PrivatePostgres

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0
"""Seconds any awaited condition gets before the test fails."""
TEST_LIMITS = StreamLimits(events_max_bytes=64 * 1024**2, tasks_max_bytes=16 * 1024**2)
"""Small streams: the shared nats-server reserves max_bytes for every test's streams."""


def quick_relay(settings: Settings, idle_poll: float = 0.5) -> Relay:
    """A relay that takes over quickly, with small streams."""
    return Relay(
        settings, idle_poll=idle_poll, standby_poll=0.1, retry_delay=0.2, limits=TEST_LIMITS
    )


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture
def settings(postgres_server_url: str) -> Iterator[Settings]:
    """A store and a subject prefix of its own: a relay publishes the whole store."""
    with isolated(postgres_server_url) as own:
        yield own


@pytest.fixture
def app(settings: Settings) -> Iterator[WorkflowRuns]:
    service = bootstrap(settings)
    try:
        yield service
    finally:
        service.close()


# ------------------------------------------------------------------------------ helpers
def start_runs(app: WorkflowRuns, count: int, workflow: str = "shop") -> None:
    """Append events through the service's commands: a workflow, runs, some steps."""
    app.register_workflow(c.RegisterWorkflow(name=workflow, triggers=["order.placed"]))
    for n in range(count):
        run_id = app.start_run(c.StartRun(workflow=workflow, input={"order": n})).run_id
        if n % 3 == 0:
            app.start_step(c.StartStep(run_id=run_id, step="charge", attempt=1))
        if n % 6 == 0:
            app.complete_step(
                c.CompleteStep(run_id=run_id, step="charge", attempt=1, output={"id": n})
            )


def append_bulk(app: WorkflowRuns, count: int, workflow: str = "bulk") -> None:
    """Append ``count`` RunStarted events fast: many runs per save (one insert each)."""
    app.register_workflow(c.RegisterWorkflow(name=workflow))
    for start in range(0, count, 500):
        runs = [
            WorkflowRun.start(uuid.uuid4(), workflow, {"n": n})  # not dispatched: one event
            for n in range(start, min(count, start + 500))
        ]
        app.save(*runs)


@dataclass(frozen=True)
class Published:
    seq: int
    subject: str
    headers: dict[str, str]
    body: EventRecord

    @property
    def position(self) -> int:
        return int(self.headers[h.HEADER_POSITION])


async def stream_contents(js: JetStreamContext, names: Names) -> list[Published]:
    """Every message of the event stream, in stream order."""
    info = await js.stream_info(names.events_stream)
    count = info.state.messages
    found: list[Published] = []
    if count == 0:
        return found
    sub = await js.subscribe(
        names.events_wildcard, stream=names.events_stream, ordered_consumer=True
    )
    try:
        while len(found) < count:
            msg = await sub.next_msg(timeout=5)
            found.append(
                Published(
                    seq=msg.metadata.sequence.stream,
                    subject=msg.subject,
                    headers=dict(msg.headers or {}),
                    body=EventRecord.from_json(json.loads(msg.data)),
                )
            )
    finally:
        await sub.unsubscribe()
    return found


async def last_position(js: JetStreamContext, names: Names) -> int:
    """The position in the stream's last message (0 when there is none)."""
    try:
        info = await js.stream_info(names.events_stream)
    except NotFoundError:
        return 0
    if info.state.messages == 0:
        return 0
    last = await js.get_msg(names.events_stream, subject=names.events_wildcard)
    return int((last.headers or {})[h.HEADER_POSITION])


async def until(
    condition: Callable[[], Awaitable[bool]],
    what: str,
    timeout: float = WAIT,
    watch: asyncio.Task[None] | None = None,
) -> None:
    await waiting.until(condition, what, timeout, watch)


async def store_records(app: WorkflowRuns) -> list[EventRecord]:
    return await asyncio.to_thread(read_after, app, 0, 1_000_000)


async def caught_up(js: JetStreamContext, names: Names, app: WorkflowRuns) -> bool:
    return await last_position(js, names) == await asyncio.to_thread(head, app)


def assert_exactly_once_in_order(
    published: list[Published], store: list[EventRecord], after: int = 0
) -> None:
    """The stream is the store (after ``after``): same events, same order, each once, the
    prev chain whole.
    """
    assert [m.position for m in published] == [r.position for r in store]
    assert [m.seq for m in published] == list(
        range(published[0].seq, published[0].seq + len(published))
    )
    prev = after
    for message in published:
        assert int(message.headers[h.HEADER_PREV_POSITION]) == prev
        assert message.body.prev_position == prev
        prev = message.position


class RelayTask:
    """A Relay running in this event loop, stopped (cleanly) on exit."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RelayTask:
        self.task = asyncio.create_task(self.relay.run(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout=WAIT)


class RelayProcess:
    """``tests/integration/relay_process.py`` as an OS process, its log in ``log_path``."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        env = {
            **os.environ,
            **settings.as_env(),
        }
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.relay_process"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=WAIT)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=WAIT)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self._log.close()


@pytest.fixture
def processes(settings: Settings, tmp_path: Path) -> Iterator[Callable[[], RelayProcess]]:
    started: list[RelayProcess] = []

    def start() -> RelayProcess:
        started.append(RelayProcess(settings, tmp_path / f"relay-{len(started)}.log"))
        return started[-1]

    try:
        yield start
    finally:
        for process in started:
            process.close()


# ------------------------------------------------------------------------------ tests
def test_every_event_reaches_the_stream_once_in_order_with_its_headers(
    settings: Settings, app: WorkflowRuns
) -> None:
    names = Names(settings.subject_prefix)
    start_runs(app, 60)

    async def scenario() -> None:
        nc = await connect(settings)
        try:
            js = nc.jetstream()
            # A long idle poll: events appended while the relay idles can only arrive
            # this fast because PostgreSQL's NOTIFY wakes it.
            relay = quick_relay(settings, idle_poll=60.0)
            async with RelayTask(relay) as running:
                await until(lambda: caught_up(js, names, app), "the backlog", watch=running.task)
                await asyncio.to_thread(start_runs, app, 30, "checkout")
                await until(lambda: caught_up(js, names, app), "live events", 10.0, running.task)
            published = await stream_contents(js, names)
        finally:
            await nc.close()
        store = await store_records(app)

        assert_exactly_once_in_order(published, store)
        assert [m.body for m in published] == store
        for message, record in zip(published, store, strict=True):
            assert message.subject == names.event_subject(record.aggregate, record.type)
            assert message.headers[h.HEADER_MSG_ID] == str(record.position)
            assert message.headers[h.HEADER_ORIGINATOR_ID] == str(record.originator_id)
            assert message.headers[h.HEADER_VERSION] == str(record.version)
            assert message.headers[h.HEADER_TYPE] == record.qualified_type
            assert message.headers[h.HEADER_TRACEPARENT] == traceparent(
                record.originator_id.hex, record.position
            )
        assert {r.type for r in store} >= {"RunStarted", "StepStarted", "StepCompleted"}
        assert relay.metrics.published_total == len(store)
        assert relay.metrics.duplicates_total == 0
        assert relay.metrics.lag == 0
        assert relay.metrics.state == "stopped"

    asyncio.run(scenario())


def test_a_restarted_relay_resumes_from_the_streams_last_message(
    settings: Settings, app: WorkflowRuns, caplog: pytest.LogCaptureFixture
) -> None:
    names = Names(settings.subject_prefix)
    caplog.set_level(logging.INFO, logger="ledgerflow.relay")
    start_runs(app, 40)

    async def scenario() -> None:
        nc = await connect(settings)
        try:
            js = nc.jetstream()
            async with RelayTask(quick_relay(settings)) as first:
                await until(lambda: caught_up(js, names, app), "the first run", watch=first.task)
            stopped_at = await last_position(js, names)
            await asyncio.to_thread(start_runs, app, 40, "checkout")
            caplog.clear()
            second = quick_relay(settings)
            async with RelayTask(second) as running:
                await until(lambda: caught_up(js, names, app), "the second run", watch=running.task)
            published = await stream_contents(js, names)
        finally:
            await nc.close()

        store = await store_records(app)
        assert_exactly_once_in_order(published, store)
        assert f"resuming after position {stopped_at} " in caplog.text
        # It read on from there: it republished nothing the stream had.
        assert second.metrics.duplicates_total == 0
        assert second.metrics.published_total == len([r for r in store if r.position > stopped_at])

    asyncio.run(scenario())


def test_a_relay_killed_mid_stream_is_replaced_without_loss_or_duplicate(
    settings: Settings, app: WorkflowRuns, processes: Callable[[], RelayProcess]
) -> None:
    names = Names(settings.subject_prefix)

    async def stream_count(js: JetStreamContext) -> int:
        try:
            return (await js.stream_info(names.events_stream)).state.messages
        except NotFoundError:
            return 0

    async def scenario() -> tuple[int, int]:
        nc = await connect(settings)
        try:
            js = nc.jetstream()
            # The relay publishes ~20,000 events/s here: kill it once the stream has grown by
            # 1,000, and start over with more events in the rare case it had finished.
            for _ in range(3):
                before = await stream_count(js)
                await asyncio.to_thread(append_bulk, app, 3000)
                target = await asyncio.to_thread(head, app)
                victim = processes()

                async def grew(before: int = before) -> bool:
                    return await stream_count(js) >= before + 1000

                await until(grew, "the relay to publish")
                victim.kill()
                killed_at = await last_position(js, names)
                if killed_at < target:
                    break
            else:
                pytest.fail("the relay finished every time before it could be killed")
            successor = processes()
            await until(lambda: caught_up(js, names, app), "the successor to catch up")
            assert successor.terminate() == 0  # SIGTERM: a clean stop
            published = await stream_contents(js, names)
        finally:
            await nc.close()
        assert f"resuming after position {killed_at} " in successor.log
        assert "relay stopped" in successor.log
        assert_exactly_once_in_order(published, await store_records(app))
        return killed_at, target

    killed_at, target = asyncio.run(scenario())
    assert 0 < killed_at < target


def test_one_relay_publishes_while_another_stands_by_and_takes_over_when_it_dies(
    settings: Settings,
    app: WorkflowRuns,
    processes: Callable[[], RelayProcess],
    caplog: pytest.LogCaptureFixture,
) -> None:
    names = Names(settings.subject_prefix)
    caplog.set_level(logging.INFO, logger="ledgerflow.relay")
    append_bulk(app, 200)

    async def scenario() -> None:
        nc = await connect(settings)
        try:
            js = nc.jetstream()
            first = processes()
            await until(lambda: caught_up(js, names, app), "the first relay")
            standby = quick_relay(settings)
            async with RelayTask(standby) as second:

                async def standing_by() -> bool:
                    return standby.metrics.state == "standby"

                await until(standing_by, "the second relay to stand by", watch=second.task)
                await asyncio.to_thread(append_bulk, app, 500)
                await until(lambda: caught_up(js, names, app), "the first relay, again")
                assert standby.metrics.published_total == 0
                assert standby.metrics.state == "standby"

                first.kill()
                await asyncio.to_thread(append_bulk, app, 500)
                await until(lambda: caught_up(js, names, app), "the takeover", watch=second.task)
                assert standby.metrics.state == "active"
                assert standby.metrics.published_total == 500
                assert standby.metrics.duplicates_total == 0

                late = quick_relay(settings)
                async with RelayTask(late) as third:

                    async def late_standing_by() -> bool:
                        return late.metrics.state == "standby"

                    await until(late_standing_by, "a third relay to stand by", watch=third.task)
                assert late.metrics.state == "stopped"  # a standing-by relay stops at once too
                assert late.metrics.published_total == 0
            published = await stream_contents(js, names)
        finally:
            await nc.close()
        assert_exactly_once_in_order(published, await store_records(app))
        assert "standing by" in caplog.text
        assert "relay active" in first.log

    asyncio.run(scenario())


def test_a_relay_that_loses_its_lock_session_stops_and_is_elected_again(
    settings: Settings, app: WorkflowRuns, caplog: pytest.LogCaptureFixture
) -> None:
    names = Names(settings.subject_prefix)
    caplog.set_level(logging.INFO, logger="ledgerflow.relay")
    append_bulk(app, 100)
    dbname = PostgresParams.from_url(settings.database_url).dbname

    def terminate_lock_session() -> int:
        with psycopg.connect(
            PostgresParams.from_url(settings.database_url).conninfo(), autocommit=True
        ) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'ledgerflow-relay' AND datname = %s",
                (dbname,),
            ).fetchall()
        return len(rows)

    async def scenario() -> None:
        nc = await connect(settings)
        try:
            js = nc.jetstream()
            relay = quick_relay(settings)
            async with RelayTask(relay) as running:
                await until(lambda: caught_up(js, names, app), "the relay", watch=running.task)
                assert await asyncio.to_thread(terminate_lock_session) == 1

                async def resynced() -> bool:
                    return relay.metrics.resyncs_total >= 2 and relay.metrics.active

                await until(resynced, "the relay to be elected again", watch=running.task)
                await asyncio.to_thread(append_bulk, app, 100)
                await until(lambda: caught_up(js, names, app), "new events", watch=running.task)
            published = await stream_contents(js, names)
        finally:
            await nc.close()
        assert_exactly_once_in_order(published, await store_records(app))
        assert "lost the PostgreSQL session holding the relay lock" in caplog.text

    asyncio.run(scenario())


def test_after_a_nats_restart_the_relay_finds_the_stream_end_again_and_goes_on(
    settings: Settings, app: WorkflowRuns, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A restarted server forgets the last message id once it is older than the duplicate
    window, so the ordering guard refuses the next publish: the relay must resync, not stall.
    """
    caplog.set_level(logging.INFO, logger="ledgerflow.relay")
    names = Names(settings.subject_prefix)
    append_bulk(app, 300)
    window = 0.5
    limits = replace(TEST_LIMITS, duplicate_window=window)

    async def scenario(private: Settings, server: PrivateNats) -> list[Published]:
        relay = Relay(private, standby_poll=0.1, retry_delay=0.2, ack_timeout=2.0, limits=limits)
        async with RelayTask(relay) as running:
            nc = await connect(private)
            try:
                js = nc.jetstream()
                await until(lambda: caught_up(js, names, app), "the relay", watch=running.task)
            finally:
                await nc.close()
            published_at = time.monotonic()

            async def window_lapsed() -> bool:
                return time.monotonic() - published_at > 2 * window

            await until(window_lapsed, "the duplicate window to lapse")
            await asyncio.to_thread(server.restart)
            await asyncio.to_thread(append_bulk, app, 300)
            nc = await connect(private)
            try:
                js = nc.jetstream()
                await until(lambda: caught_up(js, names, app), "the relay after the restart")
                published = await stream_contents(js, names)
            finally:
                await nc.close()
        assert relay.metrics.resyncs_total >= 2
        return published

    try:
        server = PrivateNats(tmp_path / "nats")
    except MissingBinaryError as e:
        pytest.skip(str(e))
    with server:
        private = settings.model_copy(update={"nats_url": server.url})
        published = asyncio.run(scenario(private, server))
    assert_exactly_once_in_order(published, read_after(app, 0, 10_000))
    assert "wrong last msg ID" in caplog.text


def test_a_relay_stops_while_postgres_is_down_and_goes_on_once_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ledgerflow.relay")
    try:
        server = PrivatePostgres(tmp_path / "postgres")
    except MissingBinaryError as e:
        pytest.skip(str(e))

    async def scenario(settings: Settings, app: WorkflowRuns) -> list[Published]:
        names = Names(settings.subject_prefix)
        nc = await connect(settings)
        try:
            js = nc.jetstream()
            relay = quick_relay(settings)
            async with RelayTask(relay) as running:
                await until(lambda: caught_up(js, names, app), "the relay", watch=running.task)
                await asyncio.to_thread(server.kill)

                async def inactive() -> bool:
                    return not relay.metrics.active

                await until(inactive, "the relay to stop publishing", watch=running.task)
                await asyncio.to_thread(server.restart)
                await asyncio.to_thread(append_bulk, app, 200, "after")
                await until(lambda: caught_up(js, names, app), "the relay", watch=running.task)
                assert relay.metrics.active
            return await stream_contents(js, names)
        finally:
            await nc.close()

    with server:
        settings = Settings(
            database_url=server.dsn_for("ledgerflow"), subject_prefix=f"t{uuid.uuid4().hex[:8]}"
        )
        init_database(settings)
        app = bootstrap(settings)
        try:
            append_bulk(app, 200)
            published = asyncio.run(scenario(settings, app))
            assert_exactly_once_in_order(published, read_after(app, 0, 10_000))
        finally:
            app.close()
            asyncio.run(delete_streams(settings))
    assert "lost the PostgreSQL session holding the relay lock" in caplog.text


def test_a_position_taken_by_no_event_is_linked_over_in_the_prev_chain(
    settings: Settings, app: WorkflowRuns
) -> None:
    names = Names(settings.subject_prefix)
    start_runs(app, 3)
    before_gap = head(app)
    with psycopg.connect(
        PostgresParams.from_url(settings.database_url).conninfo(), autocommit=True
    ) as conn:
        conn.execute(
            "SELECT nextval(pg_get_serial_sequence('ledgerflow_events', 'notification_id'))"
        )
    start_runs(app, 3, "checkout")

    async def scenario() -> list[Published]:
        nc = await connect(settings)
        try:
            js = nc.jetstream()
            async with RelayTask(quick_relay(settings)) as running:
                await until(lambda: caught_up(js, names, app), "the relay", watch=running.task)
            return await stream_contents(js, names)
        finally:
            await nc.close()

    published = asyncio.run(scenario())
    assert_exactly_once_in_order(published, read_after(app, 0, 10_000))
    after_gap = next(m for m in published if m.position > before_gap)
    assert after_gap.position == before_gap + 2
    assert after_gap.headers[h.HEADER_PREV_POSITION] == str(before_gap)


def test_after_the_stream_is_purged_the_relay_goes_on_from_the_stores_head(
    settings: Settings, app: WorkflowRuns
) -> None:
    """What a purged stream held is unknown: consumers backfill from the store, and the
    relay must not flood the stream with the whole log again.
    """
    names = Names(settings.subject_prefix)
    start_runs(app, 5)

    async def scenario() -> tuple[int, list[Published]]:
        nc = await connect(settings)
        try:
            js = nc.jetstream()
            async with RelayTask(quick_relay(settings)) as running:
                await until(lambda: caught_up(js, names, app), "the relay", watch=running.task)
            await js.purge_stream(names.events_stream)
            purged_at = await asyncio.to_thread(head, app)
            async with RelayTask(quick_relay(settings)) as running:

                async def resumed() -> bool:
                    return running.relay.metrics.resyncs_total == 1

                await until(resumed, "the relay", watch=running.task)
                await asyncio.to_thread(start_runs, app, 5, "checkout")
                await until(lambda: caught_up(js, names, app), "new events", watch=running.task)
            return purged_at, await stream_contents(js, names)
        finally:
            await nc.close()

    purged_at, published = asyncio.run(scenario())
    assert_exactly_once_in_order(published, read_after(app, purged_at, 10_000), purged_at)


def test_ensure_streams_is_idempotent_and_updates_a_changed_configuration(
    settings: Settings,
) -> None:
    names = Names(settings.subject_prefix)

    async def scenario() -> None:
        nc: Client = await connect(settings)
        try:
            js = nc.jetstream()
            await ensure_streams(js, names, TEST_LIMITS)
            await ensure_streams(js, names, TEST_LIMITS)
            wider = replace(TEST_LIMITS, events_max_bytes=2 * TEST_LIMITS.events_max_bytes)
            await ensure_streams(js, names, wider)
            events = await js.stream_info(names.events_stream)
            tasks = await js.stream_info(names.tasks_stream)
        finally:
            await nc.close()
        assert events.config.subjects == [names.events_wildcard]
        assert events.config.max_bytes == wider.events_max_bytes
        assert events.config.duplicate_window == 120
        assert tasks.config.subjects == [f"{names.prefix}.task.>"]
        assert tasks.config.retention == RetentionPolicy.WORK_QUEUE

    asyncio.run(scenario())


def test_an_unreachable_nats_server_is_reported_with_its_url() -> None:
    with pytest.raises(NatsUnavailableError, match=r"nats://127\.0\.0\.1:1\b"):
        asyncio.run(connect(Settings(nats_url="nats://127.0.0.1:1")))


def test_each_dispatch_becomes_one_worker_task_on_its_queue(
    settings: Settings, app: WorkflowRuns
) -> None:
    names = Names(settings.subject_prefix)
    # A limited workflow's runs are dispatched by the scheduler (here: by hand), not at start.
    limit = Concurrency(limit=10)
    app.register_workflow(c.RegisterWorkflow(name="shop", queue="payments", concurrency=limit))
    runs = [app.start_run(c.StartRun(workflow="shop", key=f"t-{n}")) for n in range(5)]
    for started in runs:
        app.handle(c.DispatchRun(run_id=started.run_id, reason="started", cause=started.position))
        app.handle(c.DispatchRun(run_id=started.run_id, reason="started", cause=started.position))

    async def tasks(js: JetStreamContext) -> list[dict[str, object]]:
        info = await js.stream_info(names.tasks_stream)
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            message = await js.get_msg(names.tasks_stream, seq)
            assert message.subject == names.task("payments")
            found.append(json.loads(message.data or b"{}"))
        return found

    async def scenario() -> None:
        nc = await connect(settings)
        try:
            js = nc.jetstream()
            async with RelayTask(quick_relay(settings)) as relay:
                await until(lambda: caught_up(js, names, app), "the dispatches", watch=relay.task)
            found = await tasks(js)
        finally:
            await nc.close()
        assert sorted((t["run_id"], t["dispatch"]) for t in found) == sorted(
            (str(r.run_id), 1) for r in runs
        )
        assert all(t["reason"] == "started" and t["queue"] == "payments" for t in found)

    asyncio.run(scenario())


def test_a_stream_ahead_of_its_store_is_reported_not_waited_on(
    settings: Settings, app: WorkflowRuns, caplog: pytest.LogCaptureFixture
) -> None:
    names = Names(settings.subject_prefix)
    start_runs(app, 5)

    async def scenario() -> None:
        nc = await connect(settings)
        try:
            js = nc.jetstream()
            async with RelayTask(quick_relay(settings)) as relay_task:
                await until(lambda: caught_up(js, names, app), "the runs", watch=relay_task.task)
        finally:
            await nc.close()
        # The store is reset (a fresh database) but the stream is kept.
        with isolated_store(settings) as fresh:
            caplog.set_level(logging.WARNING, logger="ledgerflow.relay")
            async with RelayTask(quick_relay(fresh)):

                async def reported() -> bool:
                    return "is ahead of the event store" in caplog.text

                await until(reported, "the relay's complaint")

    asyncio.run(scenario())


@contextlib.contextmanager
def isolated_store(settings: Settings) -> Iterator[Settings]:
    """Another, empty store under the same subject prefix."""
    params = PostgresParams.from_url(settings.database_url)
    fresh = Settings(
        database_url=params.url(f"ledgerflow_t_{uuid.uuid4().hex[:12]}"),
        subject_prefix=settings.subject_prefix,
    )
    init_database(fresh)
    try:
        yield fresh
    finally:
        drop_database(fresh.database_url)
