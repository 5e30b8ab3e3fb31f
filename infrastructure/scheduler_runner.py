"""The scheduler role: follow the events stream to dispatch runs, and fire due timers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, ClassVar, LiteralString, cast
from uuid import UUID

import nats.errors
import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from domain.errors import DomainError
from infrastructure import metrics
from infrastructure.bootstrap import bootstrap
from infrastructure.event_log import read_after
from infrastructure.nats.connect import connect
from infrastructure.nats.names import Names
from infrastructure.postgres import read_model_schema as rs
from infrastructure.postgres import scheduler_schema as ss
from infrastructure.postgres.read_models import READ_BATCH, Reader, backfill_from, open_pool
from infrastructure.projection_runner import (
    BUG_DELAY,
    RETRY_DELAY,
    TRANSIENT,
    ProjectionBuilder,
    _pause,
    _say,
    ensure_events_stream,
)
from infrastructure.settings import Settings
from projections.projection import in_order
from projections.records import EventRecord
from services import commands as c
from services.clock import Clock, SystemClock
from services.scheduler import (
    EAGER_LEASE,
    LEASE_GRACE,
    Lease,
    Limit,
    Parent,
    Scheduler,
    Slot,
    SlotState,
    Timer,
    TimerKind,
    Wait,
)
from services.workflow_runs import WorkflowRuns

log = logging.getLogger("ledgerflow.scheduler")

POLL_INTERVAL = 0.1
"""Seconds between two looks for due timers."""
DUE_BATCH = 200
"""Due timers taken (and fired in one transaction) at a time."""

Send = Callable[[Sequence[c.Command]], None]
"""Apply commands (idempotent ones); a refusal is logged, never raised."""

Held = Callable[[UUID], Awaitable[bool | None]]
"""Whether a worker still holds an eagerly started run (ADR 17); None: cannot tell now."""
HELD_TIMEOUT = 2.0
"""Seconds the scheduler waits for a holder's answer."""
HELD = b"held"
"""The answer of a worker that holds the run."""

Pool = ConnectionPool[psycopg.Connection[Any]]


# --------------------------------------------------------------------------- commands
def sender(app: WorkflowRuns, batch_size: int) -> Send:
    """Send commands in batches of ``batch_size``; domain refusals are expected (the run
    ended, the wait was settled) and skipped, so they never block what follows."""

    def send(commands: Sequence[c.Command]) -> None:
        for start in range(0, len(commands), batch_size):
            chunk = commands[start : start + batch_size]
            appended = app.events_appended
            results = app.execute(chunk)
            metrics.EVENTS_APPENDED.inc(app.events_appended - appended)
            for command, result in zip(chunk, results, strict=True):
                if isinstance(result, DomainError):
                    log.debug(
                        "%s refused (%s): %s",
                        type(command).__name__,
                        result.code,
                        result,
                        extra={"run_id": getattr(command, "run_id", None)},
                    )

    return send


# ---------------------------------------------------------------- the Postgres view
_STATEMENTS: dict[tuple[str, str], bytes] = {}
"""Each statement of the view, rendered for its schema."""


class PostgresSchedulerView:
    """The scheduler's tables, written in the caller's transaction."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str) -> None:
        self.conn = conn
        self.schema = schema
        self.t = ss.identifiers(schema)

    def _run(self, query: LiteralString, params: Sequence[Any]) -> psycopg.Cursor[Any]:
        key = (query, self.schema)
        statement = _STATEMENTS.get(key)
        if statement is None:  # composed and rendered once per statement (issue 6)
            statement = sql.SQL(query).format(**self.t).as_bytes(self.conn)
            _STATEMENTS[key] = statement
        return self.conn.execute(statement, params)

    def put_timer(self, timer: Timer) -> None:
        self._run(
            "INSERT INTO {timers} (run_id, kind, name, due_at, cause) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (run_id, kind, name)"
            " DO UPDATE SET due_at = excluded.due_at, cause = excluded.cause",
            (timer.run_id, timer.kind, timer.name, timer.due_at, timer.cause),
        )

    def delete_timer(self, run_id: UUID, kind: TimerKind, name: str) -> None:
        self._run(
            "DELETE FROM {timers} WHERE run_id = %s AND kind = %s AND name = %s",
            (run_id, kind, name),
        )

    def put_lease(self, lease: Lease) -> None:
        self._run(
            "INSERT INTO {leases} (run_id, due_at, cause, suspect) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (run_id) DO UPDATE SET due_at = excluded.due_at,"
            " cause = excluded.cause, suspect = excluded.suspect",
            (lease.run_id, lease.due_at, lease.cause, lease.suspect),
        )

    def delete_lease(self, run_id: UUID) -> None:
        self._run("DELETE FROM {leases} WHERE run_id = %s", (run_id,))

    def put_wait(self, wait: Wait) -> None:
        self._run(
            "INSERT INTO {waits} (run_id, name, event_name, match) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (run_id, name)"
            " DO UPDATE SET event_name = excluded.event_name, match = excluded.match",
            (wait.run_id, wait.name, wait.event_name, json.dumps(wait.match)),
        )

    def delete_wait(self, run_id: UUID, name: str) -> None:
        self._run("DELETE FROM {waits} WHERE run_id = %s AND name = %s", (run_id, name))

    def open_waits(self, event_name: str) -> list[Wait]:
        rows = self._run(
            "SELECT run_id, name, event_name, match FROM {waits} WHERE event_name = %s"
            " ORDER BY run_id, name",
            (event_name,),
        ).fetchall()
        return [Wait(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    def put_parent(self, run_id: UUID, parent: Parent) -> None:
        self._run(
            "INSERT INTO {runs} (run_id, parent_run_id, parent_step) VALUES (%s, %s, %s)"
            " ON CONFLICT (run_id) DO NOTHING",
            (run_id, parent.run_id, parent.step),
        )

    def parent_of(self, run_id: UUID) -> Parent | None:
        row = self._run(
            "SELECT parent_run_id, parent_step FROM {runs} WHERE run_id = %s", (run_id,)
        ).fetchone()
        return Parent(row[0], row[1]) if row else None

    def end_run(self, run_id: UUID) -> None:
        for table in ("timers", "leases", "waits", "runs"):
            self._run(f"DELETE FROM {{{table}}} WHERE run_id = %s", (run_id,))

    def put_triggers(self, type_id: UUID, workflow: str | None, triggers: Iterable[str]) -> None:
        names = sorted(set(triggers))
        if workflow is None:
            self._run("UPDATE {triggers} SET event_names = %s WHERE type_id = %s", (names, type_id))
            return
        self._run(
            "INSERT INTO {triggers} (type_id, workflow, event_names) VALUES (%s, %s, %s)"
            " ON CONFLICT (type_id) DO UPDATE SET event_names = excluded.event_names",
            (type_id, workflow, names),
        )

    def triggered_workflows(self, event_name: str) -> list[str]:
        rows = self._run(
            "SELECT workflow FROM {triggers} WHERE %s = ANY(event_names) ORDER BY workflow",
            (event_name,),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def put_limit(self, type_id: UUID, workflow: str | None, limit: Limit | None) -> str | None:
        max_runs = limit.limit if limit else None
        key = limit.key if limit else None
        if workflow is None:
            row = self._run(
                "UPDATE {limits} SET max_runs = %s, key_field = %s WHERE type_id = %s"
                " RETURNING workflow",
                (max_runs, key, type_id),
            ).fetchone()
            return str(row[0]) if row else None
        self._run(
            "INSERT INTO {limits} (type_id, workflow, max_runs, key_field) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (type_id)"
            " DO UPDATE SET max_runs = excluded.max_runs, key_field = excluded.key_field",
            (type_id, workflow, max_runs, key),
        )
        return workflow

    def limit_of(self, workflow: str) -> Limit | None:
        row = self._run(
            "SELECT max_runs, key_field FROM {limits} WHERE workflow = %s ORDER BY type_id LIMIT 1",
            (workflow,),
        ).fetchone()
        return Limit(int(row[0]), row[1]) if row and row[0] is not None else None

    def slot_of(self, run_id: UUID) -> Slot | None:
        row = self._run(
            "SELECT run_id, workflow, key_value, state, since FROM {slots} WHERE run_id = %s",
            (run_id,),
        ).fetchone()
        return _slot(row) if row else None

    def put_slot(self, slot: Slot) -> None:
        self._run(
            "INSERT INTO {slots} (run_id, workflow, key_value, state, since)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (run_id) DO UPDATE SET"
            " workflow = excluded.workflow, key_value = excluded.key_value,"
            " state = excluded.state, since = excluded.since",
            (slot.run_id, slot.workflow, slot.group, slot.state, slot.since),
        )

    def delete_slot(self, run_id: UUID) -> None:
        self._run("DELETE FROM {slots} WHERE run_id = %s", (run_id,))

    def held(self, workflow: str, group: str) -> int:
        row = self._run(
            "SELECT count(*) FROM {slots}"
            " WHERE workflow = %s AND key_value = %s AND state = 'held'",
            (workflow, group),
        ).fetchone()
        return int(row[0]) if row else 0

    def queued(self, workflow: str, group: str | None, limit: int) -> list[Slot]:
        rows = self._run(
            "SELECT run_id, workflow, key_value, state, since FROM {slots}"
            " WHERE workflow = %s AND state = 'queued'"
            " AND (%s::text IS NULL OR key_value = %s::text)"
            " ORDER BY since, run_id LIMIT %s",
            (workflow, group, group, limit),
        ).fetchall()
        return [_slot(r) for r in rows]


def _slot(row: Sequence[Any]) -> Slot:
    return Slot(row[0], row[1], row[2], cast(SlotState, row[3]), int(row[4]))


# ------------------------------------------------------------ following the events
@dataclass(frozen=True)
class Applied:
    position: int
    applied: int
    backfilled: int
    sent: int


def apply_batch(
    conn: psycopg.Connection[Any],
    schema: str,
    batch: Iterable[EventRecord],
    read: Reader,
    send: Send,
    eager_lease: timedelta = EAGER_LEASE,
) -> Applied:
    """Decide on a delivered batch, send the commands, then write the scheduler's rows and
    its position in one transaction: duplicates are skipped and gaps filled from the store.

    The commands are sent before the commit, so a crash in between only sends them again,
    which changes nothing (each is idempotent).
    """
    records = list(batch)
    delivered = {r.position for r in records}
    with conn.transaction():
        ss.lock(conn, schema)
        reached = ss.position(conn, schema)
        todo = in_order(records, reached, backfill_from(read))
        if not todo:
            return Applied(reached, 0, 0, 0)
        scheduler = Scheduler(PostgresSchedulerView(conn, schema), eager_lease)
        commands = [command for record in todo for command in scheduler.process(record)]
        if commands:
            send(commands)
        reached = todo[-1].position
        ss.set_position(conn, schema, reached)
    backfilled = sum(1 for r in todo if r.position not in delivered)
    return Applied(reached, len(todo), backfilled, len(commands))


def catch_up(
    conn: psycopg.Connection[Any],
    schema: str,
    read: Reader,
    send: Send,
    *,
    until: int | None = None,
    batch_size: int = READ_BATCH,
    eager_lease: timedelta = EAGER_LEASE,
) -> int:
    """Apply the store's records after the tracked position (up to ``until``), one
    transaction per ``batch_size`` records; the number applied."""
    applied = 0
    while True:
        with conn.transaction():
            ss.lock(conn, schema)
            reached = ss.position(conn, schema)
            if until is not None and reached >= until:
                return applied
            records = [r for r in read(reached, batch_size) if until is None or r.position <= until]
            if not records:
                return applied
            result = apply_batch(conn, schema, records, read, send, eager_lease)
        applied += result.applied


class SchedulerFollower(ProjectionBuilder):
    """The scheduler's durable consumer: the projection builder's loop, the scheduler's
    decisions (commands sent, then rows and position committed, then acks)."""

    logger: ClassVar[logging.Logger] = log

    def __init__(
        self, *args: Any, send: Send, eager_lease: timedelta = EAGER_LEASE, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.send = send
        self.eager_lease = eager_lease

    def _apply(self, records: list[EventRecord]) -> None:
        with self.pool.connection() as conn:
            first = min(records, key=lambda r: r.position)
            if first.prev_position > self.position + READ_BATCH:
                # A large gap (purged stream): fill it in batches, not in one transaction.
                self._caught_up(
                    self.name,
                    catch_up(
                        conn,
                        self.schema,
                        self.read,
                        self.send,
                        until=first.prev_position,
                        eager_lease=self.eager_lease,
                    ),
                )
            result = apply_batch(conn, self.schema, records, self.read, self.send, self.eager_lease)
        self.position = max(self.position, result.position)
        if result.backfilled:
            log.info(
                "gap before %d: %d record(s) read from the store", first.position, result.backfilled
            )
        log.debug("applied %d, sent %d, now at %d", result.applied, result.sent, result.position)

    def _catch_up_if_behind_sync(self) -> None:
        with self.pool.connection() as conn:
            if self.position >= rs.store_head(conn, self.schema):
                return
            applied = catch_up(
                conn, self.schema, self.read, self.send, eager_lease=self.eager_lease
            )
            self._caught_up(self.name, applied)
            with conn.transaction():
                self.position = max(self.position, ss.position(conn, self.schema))


# -------------------------------------------------------------------------- timers
def fire_due(pool: Pool, schema: str, now: datetime, send: Send, limit: int = DUE_BATCH) -> int:
    """Send the command of every timer due by ``now`` (up to ``limit``) and delete them, in
    one transaction; the number fired. Rows another instance holds are skipped."""
    t = ss.identifiers(schema)
    with pool.connection() as conn, conn.transaction():
        rows = conn.execute(
            sql.SQL(
                "SELECT run_id, kind, name, due_at, cause FROM {timers} WHERE due_at <= %s"
                " ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED"
            ).format(**t),
            (now, limit),
        ).fetchall()
        if not rows:
            return 0
        timers = [Timer(r[0], cast(TimerKind, r[1]), r[2], r[3], r[4]) for r in rows]
        send([timer.command() for timer in timers])
        with conn.cursor() as cursor:
            cursor.executemany(
                sql.SQL(
                    "DELETE FROM {timers} WHERE run_id = %s AND kind = %s AND name = %s"
                ).format(**t),
                [(timer.run_id, timer.kind, timer.name) for timer in timers],
            )
    log.debug("fired %d timer(s)", len(timers))
    return len(timers)


async def expire_leases(
    pool: Pool,
    schema: str,
    now: datetime,
    send: Send,
    held: Held,
    eager_lease: timedelta = EAGER_LEASE,
    grace: timedelta = LEASE_GRACE,
    limit: int = DUE_BATCH,
) -> int:
    """Ask the holder of each eager run whose lease is due (up to ``limit``): one that
    answers keeps it for another lease; one that does not is asked again after
    ``grace``, and if it does not answer then either, the run goes to its queue (ADR 17).
    The number of leases looked at."""
    due = await asyncio.to_thread(_due_leases, pool, schema, now, limit)
    if not due:
        return 0
    answers = await asyncio.gather(*(held(lease.run_id) for lease in due))
    if any(answer is None for answer in answers):
        # This scheduler cannot ask now: nothing is decided on what it could not hear.
        raise HoldersUnreachableError("cannot ask the holders of eager runs over NATS")
    after = [
        lease.after(answer, now, eager_lease, grace)
        for lease, answer in zip(due, answers, strict=True)
    ]
    await asyncio.to_thread(_settle_leases, pool, schema, list(zip(due, after, strict=True)), send)
    return len(due)


class HoldersUnreachableError(ConnectionError):
    """The scheduler's own NATS connection is down: no lease is renewed or expired."""


def _due_leases(pool: Pool, schema: str, now: datetime, limit: int) -> list[Lease]:
    with pool.connection() as conn:
        rows = conn.execute(
            sql.SQL(
                "SELECT run_id, due_at, cause, suspect FROM {leases} WHERE due_at <= %s"
                " ORDER BY due_at LIMIT %s"
            ).format(**ss.identifiers(schema)),
            (now, limit),
        ).fetchall()
    return [Lease(r[0], r[1], r[2], r[3]) for r in rows]


def _settle_leases(
    pool: Pool, schema: str, settled: list[tuple[Lease, Lease | c.Command]], send: Send
) -> None:
    """Write what each lease became, only where it is as it was read (not deleted by its
    run's end, nor settled by another scheduler instance meanwhile). The commands are
    sent before the commit, as :func:`fire_due` does: a crash sends them again."""
    t = ss.identifiers(schema)
    unchanged = " WHERE run_id = %s AND due_at = %s AND suspect = %s"
    commands: list[c.Command] = []
    with pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
        for lease, after in settled:
            key = (lease.run_id, lease.due_at, lease.suspect)
            if isinstance(after, Lease):
                if after != lease:
                    cursor.execute(
                        sql.SQL("UPDATE {leases} SET due_at = %s, suspect = %s" + unchanged).format(
                            **t
                        ),
                        (after.due_at, after.suspect, *key),
                    )
                continue
            cursor.execute(sql.SQL("DELETE FROM {leases}" + unchanged).format(**t), key)
            if cursor.rowcount:
                commands.append(after)
        if commands:
            send(commands)
    if commands:
        log.info("%d eager run(s) whose worker did not answer went to their queue", len(commands))


def held_over_nats(nc: Any, names: Names) -> Held:
    """Ask ``<prefix>.held.<run_id>``: ``held`` in reply, the run is held; no responders,
    no answer in time or any other answer, it may not be (:meth:`Lease.after` asks once
    more before it takes the run). None when this scheduler cannot ask at all."""

    async def held(run_id: UUID) -> bool | None:
        reconnects = nc.stats["reconnects"]
        if not nc.is_connected:
            return None
        try:
            reply = await nc.request(names.held(str(run_id)), b"", timeout=HELD_TIMEOUT)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            # Silence, unless this scheduler was the one cut off meanwhile (a request
            # made while reconnecting waits in a buffer and times out).
            if not nc.is_connected or nc.stats["reconnects"] != reconnects:
                return None
            return False
        except nats.errors.Error:
            return None
        return bool(reply.data == HELD)

    return held


async def poll_leases(
    pool: Pool,
    schema: str,
    clock: Clock,
    send: Send,
    stop: asyncio.Event,
    held: Held,
    eager_lease: timedelta = EAGER_LEASE,
) -> None:
    """Look at due leases every POLL_INTERVAL, apart from the timers: asking holders
    takes up to HELD_TIMEOUT, which must not hold up a sleep's wake-up."""

    async def once() -> int:
        return await expire_leases(pool, schema, clock.now(), send, held, eager_lease)

    await _poll("leases", once, stop)


async def poll_timers(
    pool: Pool, schema: str, clock: Clock, send: Send, stop: asyncio.Event
) -> None:
    """Fire due timers every POLL_INTERVAL (at once again while a full batch was due)."""

    async def once() -> int:
        return await asyncio.to_thread(fire_due, pool, schema, clock.now(), send)

    await _poll("timers", once, stop)


async def _poll(what: str, once: Callable[[], Awaitable[int]], stop: asyncio.Event) -> None:
    """Call ``once`` every POLL_INTERVAL until ``stop``, at once again while it did a full
    batch (DUE_BATCH); a failure waits before the next try."""
    while not stop.is_set():
        try:
            done = await once()
        except TRANSIENT as error:
            if stop.is_set():
                break
            log.warning("%s: %s; retrying in %g s", what, _say(error), RETRY_DELAY)
            await _pause(stop, RETRY_DELAY)
            continue
        except Exception:
            log.exception("%s: failed; retrying in %g s", what, BUG_DELAY)
            await _pause(stop, BUG_DELAY)
            continue
        if done < DUE_BATCH:
            await _pause(stop, POLL_INTERVAL)


# ---------------------------------------------------------------------------- role
async def run(settings: Settings, stop: asyncio.Event, clock: Clock | None = None) -> None:
    """Follow the events stream and fire due timers until ``stop`` is set.

    ``clock`` says when a timer is due (the system clock unless a test moves time).
    Raises SchedulerTablesMissingError before `db init`.
    """
    clock = clock or SystemClock()
    names = Names(settings.subject_prefix)
    pool = await asyncio.to_thread(open_pool, settings, 3)
    app: WorkflowRuns | None = None
    try:
        position = await asyncio.to_thread(_position, pool, settings.db_schema)
        app = await asyncio.to_thread(bootstrap, settings, clock=clock)
        send = sender(app, settings.max_command_batch)
        read = partial(read_after, app)
        nc = await connect(settings, name="ledgerflow-scheduler")
        try:
            js = nc.jetstream()
            log.info("scheduler following %s from %d", names.events_stream, position)
            with contextlib.suppress(nats.errors.Error):
                await ensure_events_stream(js, names)
            lease = timedelta(seconds=settings.eager_lease_seconds)
            follower = SchedulerFollower(
                ss.NAME, settings.db_schema, names, js, pool, read, send=send, eager_lease=lease
            )
            follower.position = position
            async with asyncio.TaskGroup() as group:
                group.create_task(follower.run(stop), name="scheduler-events")
                group.create_task(
                    poll_timers(pool, settings.db_schema, clock, send, stop),
                    name="scheduler-timers",
                )
                held = held_over_nats(nc, names)
                group.create_task(
                    poll_leases(pool, settings.db_schema, clock, send, stop, held, lease),
                    name="scheduler-leases",
                )
        finally:
            with contextlib.suppress(nats.errors.Error):
                await nc.flush(timeout=5)
            await nc.close()
    finally:
        if app is not None:
            await asyncio.to_thread(app.close)
        await asyncio.to_thread(pool.close)
    log.info("scheduler stopped")


def _position(pool: Pool, schema: str) -> int:
    with pool.connection() as conn:
        try:
            with conn.transaction():
                conn.execute(
                    sql.SQL("SELECT 1 FROM {leases} LIMIT 1").format(**ss.identifiers(schema))
                )
                return ss.position(conn, schema)
        except psycopg.errors.UndefinedTable:
            raise ss.SchedulerTablesMissingError(
                "the scheduler's tables are missing: run `ledgerflow db init`"
            ) from None
