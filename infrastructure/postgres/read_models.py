"""Apply records to the read models exactly once, catch up from the store, rebuild, report."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from infrastructure.bootstrap import bootstrap
from infrastructure.event_log import read_after
from infrastructure.postgres import read_model_schema as s
from infrastructure.postgres.read_model_schema import init_read_models
from infrastructure.postgres.read_model_views import VIEWS
from infrastructure.postgres.schema import PostgresParams
from infrastructure.settings import Settings
from projections.catalog import PROJECTIONS, projection_names
from projections.projection import Backfill, in_order
from projections.records import EventRecord

__all__ = [
    "BatchResult",
    "ProjectionStatus",
    "ReadModelsMissingError",
    "RebuildInProgressError",
    "apply_batch",
    "apply_batches",
    "catch_up",
    "connect",
    "init_read_models",
    "open_pool",
    "rebuild",
    "status",
]

log = logging.getLogger("ledgerflow.projections")

Reader = Callable[[int, int], Sequence[EventRecord]]
"""``read(after, limit)``: up to ``limit`` records from the store after ``after``, in order."""

Progress = Callable[[int, int], None]
"""``progress(position, head)``, called after each batch of a rebuild."""

READ_BATCH = 5_000
"""Records read from the store per transaction when catching up or rebuilding."""
SWAP_LOCK_TIMEOUT = "2s"
"""The longest a swap waits for a lock (and so makes readers queue behind it) per attempt."""
SWAP_ATTEMPTS = 5


class ReadModelsMissingError(RuntimeError):
    """The read-model tables were never created (``ledgerflow db init`` creates them)."""


class RebuildInProgressError(RuntimeError):
    """Another process is rebuilding this projection right now."""


@dataclass(frozen=True)
class BatchResult:
    name: str
    version: int
    position: int  # the tracked position after the batch
    applied: int
    backfilled: int  # of the applied records, those read from the store to fill a gap
    records: tuple[EventRecord, ...] = ()  # the applied ones, in order


@dataclass(frozen=True)
class ProjectionStatus:
    name: str
    version: int
    position: int
    head: int
    lag: int
    state: str


def conninfo(settings: Settings) -> str:
    return PostgresParams.from_url(settings.database_url).conninfo()


def connect(settings: Settings) -> psycopg.Connection[Any]:
    """A connection in autocommit mode: every unit of work is an explicit transaction."""
    return psycopg.connect(conninfo(settings), autocommit=True)


def open_pool(settings: Settings, max_size: int = 4) -> ConnectionPool[psycopg.Connection[Any]]:
    """A pool of autocommit connections on ``settings``' database (the caller closes it)."""
    return ConnectionPool(
        conninfo(settings),
        min_size=1,
        max_size=max_size,
        kwargs={"autocommit": True},
        open=True,
        name="ledgerflow-read-models",
    )


@contextmanager
def store_reader(settings: Settings) -> Iterator[Reader]:
    """A reader of the event store ``settings`` names, closed on exit."""
    app = bootstrap(settings)
    try:
        yield partial(read_after, app)
    finally:
        app.close()


def backfill_from(read: Reader, chunk: int = READ_BATCH) -> Backfill:
    def backfill(after: int, until: int) -> list[EventRecord]:
        found: list[EventRecord] = []
        while after < until:
            records = read(after, min(chunk, until - after))
            if not records:
                break
            found.extend(r for r in records if r.position <= until)
            after = records[-1].position
        return found

    return backfill


def apply_batch(
    conn: psycopg.Connection[Any],
    schema: str,
    name: str,
    batch: Iterable[EventRecord],
    read: Reader,
    *,
    version: int | None = None,
) -> BatchResult:
    """Apply a delivered batch to projection ``name`` and track its position, in one
    transaction: duplicates are skipped and gaps filled from the store (exactly once).

    ``version`` None means the live version, looked up under the projection's lock, so a
    rebuild's swap between two batches is simply followed. A version being built belongs
    to its rebuild alone: it is written without that lock, so runners are not slowed.
    """
    versions = None if version is None else {name: version}
    return apply_batches(conn, schema, [name], batch, read, versions=versions)[0]


def apply_batches(
    conn: psycopg.Connection[Any],
    schema: str,
    names: Sequence[str],
    batch: Iterable[EventRecord],
    read: Reader,
    *,
    versions: Mapping[str, int] | None = None,
) -> list[BatchResult]:
    """Apply a batch to every projection in ``names`` and track each one's position, all in
    one transaction (the projections in lockstep).

    ``versions`` None means the live versions, under the projections' locks (taken in
    ``names``' order), as :func:`apply_batch` does for one; else the versions being built,
    by name. Each projection keeps its own position, so one that a rebuild swapped in
    further on or further back still gets each record exactly once.
    """
    records = list(batch)
    with conn.transaction():
        if versions is None:
            s.lock_many(conn, schema, names)
        targets = _targets(conn, schema, names, versions)
        results = [
            _apply(conn, schema, name, records, read, target)
            for name, target in zip(names, targets, strict=True)
        ]
        s.set_positions(
            conn, schema, [(r.name, r.version, r.position) for r in results if r.applied]
        )
    return results


def _apply(
    conn: psycopg.Connection[Any],
    schema: str,
    name: str,
    records: Sequence[EventRecord],
    read: Reader,
    target: s.Tracked,
) -> BatchResult:
    """Apply ``records`` after ``target``'s position to its tables; the caller holds the
    transaction and records the new position."""
    delivered = {r.position for r in records}
    todo = in_order(records, target.position, backfill_from(read))
    if not todo:
        return BatchResult(name, target.version, target.position, 0, 0)
    view = VIEWS[name](conn, schema, target.version)
    projection = PROJECTIONS[name](view)
    handled = projection.handled_types()
    view.prefetch(r.originator_id for r in todo if r.qualified_type in handled)
    for record in todo:
        projection.process(record)
    view.flush()
    backfilled = sum(1 for r in todo if r.position not in delivered)
    return BatchResult(name, target.version, todo[-1].position, len(todo), backfilled, tuple(todo))


def catch_up(
    conn: psycopg.Connection[Any],
    schema: str,
    name: str,
    read: Reader,
    *,
    version: int | None = None,
    until: int | None = None,
    batch_size: int = READ_BATCH,
    progress: Callable[[int], None] | None = None,
    committed: Callable[[BatchResult], None] | None = None,
) -> int:
    """Apply the store's records after the tracked position (up to ``until``), one
    transaction per ``batch_size`` records; the number applied. ``committed`` is told of
    each batch once its transaction has committed."""
    applied = 0
    while True:
        with conn.transaction():
            if version is None:
                s.lock(conn, schema, name)
            target = _target(conn, schema, name, version)
            if until is not None and target.position >= until:
                return applied
            records = list(read(target.position, batch_size))
            if until is not None:
                records = [r for r in records if r.position <= until]
            if not records:
                return applied
            result = apply_batch(conn, schema, name, records, read, version=target.version)
        applied += result.applied
        if committed is not None:
            committed(result)
        if progress is not None:
            progress(result.position)


def _target(
    conn: psycopg.Connection[Any], schema: str, name: str, version: int | None
) -> s.Tracked:
    return _targets(conn, schema, [name], None if version is None else {name: version})[0]


def _targets(
    conn: psycopg.Connection[Any],
    schema: str,
    names: Sequence[str],
    versions: Mapping[str, int] | None,
) -> list[s.Tracked]:
    """The tracking row of each projection's live version, or of its given version."""
    rows = s.tracked(conn, schema, names[0] if len(names) == 1 else None)
    found = {(t.name, t.version if versions is not None else t.state): t for t in rows}
    targets = []
    for name in names:
        key = (name, versions[name] if versions is not None else "live")
        if key not in found:
            what = f"version {key[1]}" if versions is not None else "a live version"
            raise ReadModelsMissingError(
                f"projection {name!r} has no {what} in {schema}.{s.TRACKING_TABLE}; "
                "run `ledgerflow db init`"
            )
        targets.append(found[key])
    return targets


# ----------------------------------------------------------------------------- rebuild
def rebuild(
    settings: Settings,
    name: str | None = None,
    progress: Progress | None = None,
    *,
    batch_size: int = READ_BATCH,
) -> None:
    """Rebuild projection ``name`` (every projection when None) from the store, beside the
    live version, then swap it in atomically and drop the old one: readers never wait.

    Several projections are rebuilt in lockstep: each batch is read from the store once
    and applied to every new version.
    """
    names = projection_names(name)
    with store_reader(settings) as read, connect(settings) as conn:
        rebuild_many(conn, settings.db_schema, names, read, progress, batch_size=batch_size)


def rebuild_many(
    conn: psycopg.Connection[Any],
    schema: str,
    names: Sequence[str],
    read: Reader,
    progress: Progress | None = None,
    *,
    batch_size: int = READ_BATCH,
) -> dict[str, int]:
    """Build the next version of each projection, swap each in, drop the old ones."""
    with ExitStack() as guards:
        for name in names:
            guards.enter_context(_rebuild_guard(conn, schema, name))
        versions = {name: _start_version(conn, schema, name) for name in names}
        log.info("rebuilding %s", ", ".join(f"{n} as version {v}" for n, v in versions.items()))
        # Bulk phase: no secondary indexes yet, so inserts stay cheap.
        # The next batch is read (on another connection) while this one is applied.
        with ThreadPoolExecutor(1, thread_name_prefix="rebuild-read") as reader:
            ahead = reader.submit(read, 0, batch_size)
            while records := list(ahead.result()):
                ahead = reader.submit(read, records[-1].position, batch_size)
                apply_batches(conn, schema, names, records, read, versions=versions)
                if progress is not None:
                    progress(records[-1].position, s.store_head(conn, schema))
        for name, version in versions.items():
            with conn.transaction():
                s.create_indexes(conn, schema, name, version)
            retired = _swap(conn, schema, name, version, read, batch_size)
            for old in retired:
                _drop_retired(conn, schema, name, old)
            log.info("rebuilt %s: version %d is live, dropped %s", name, version, retired or "none")
        if progress is not None:
            with conn.transaction():
                last = min(_target(conn, schema, n, v).position for n, v in versions.items())
                progress(last, s.store_head(conn, schema))  # the swaps' last records
        return versions


@contextmanager
def _rebuild_guard(conn: psycopg.Connection[Any], schema: str, name: str) -> Iterator[None]:
    """A session lock: one rebuild per projection at a time, released if the process dies."""
    key = (s.LOCK_CLASS + 1, f"{schema}.{name}")
    with conn.transaction():
        row = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", key).fetchone()
    if not row or not row[0]:
        raise RebuildInProgressError(f"projection {name!r} is being rebuilt by another process")
    try:
        yield
    finally:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", key)


def _start_version(conn: psycopg.Connection[Any], schema: str, name: str) -> int:
    """Drop what an interrupted rebuild left behind; create the next version's tables."""
    with conn.transaction():
        s.lock(conn, schema, name)
        rows = s.tracked(conn, schema, name)
        for leftover in rows:
            if leftover.state != "live":
                s.drop_version(conn, schema, name, leftover.version)
                s.delete_tracking(conn, schema, name, leftover.version)
        version = max((t.version for t in rows), default=0) + 1
        s.create_version(conn, schema, name, version, indexes=False)
        s.insert_tracking(conn, schema, name, version, "building")
    return version


def _swap(
    conn: psycopg.Connection[Any],
    schema: str,
    name: str,
    version: int,
    read: Reader,
    batch_size: int,
) -> list[int]:
    """Make ``version`` live; the retired versions. Retried when a lock is not granted in
    time: a swap never queues readers behind a long query for more than SWAP_LOCK_TIMEOUT."""
    for attempt in range(1, SWAP_ATTEMPTS + 1):
        try:
            return _swap_once(conn, schema, name, version, read, batch_size)
        except psycopg.errors.LockNotAvailable:
            if attempt == SWAP_ATTEMPTS:
                raise
            log.warning("%s: swap to version %d waited too long for a lock; again", name, version)
    raise AssertionError("unreachable")


def _swap_once(
    conn: psycopg.Connection[Any],
    schema: str,
    name: str,
    version: int,
    read: Reader,
    batch_size: int,
) -> list[int]:
    """Under the projection's lock (runners wait): apply the last records, make ``version``
    live and point the stable views at it, all in one transaction."""
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'")
        s.lock(conn, schema, name)
        catch_up(conn, schema, name, read, version=version, batch_size=batch_size)
        retired = [t.version for t in s.tracked(conn, schema, name) if t.state == "live"]
        for old in retired:
            s.set_state(conn, schema, name, old, "retired")
        s.set_state(conn, schema, name, version, "live")
        s.point_views(conn, schema, name, version)
    return retired


def _drop_retired(conn: psycopg.Connection[Any], schema: str, name: str, version: int) -> None:
    try:
        with conn.transaction():
            conn.execute(f"SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'")
            s.drop_version(conn, schema, name, version)
            s.delete_tracking(conn, schema, name, version)
    except psycopg.errors.LockNotAvailable:
        # A long query still reads it: the next rebuild drops it (it is marked retired).
        log.warning("%s: version %d is still in use; it will be dropped later", name, version)


# ------------------------------------------------------------------------------ status
def status(settings: Settings) -> list[ProjectionStatus]:
    """Every projection version (live, and any being built) with its lag behind the store."""
    with connect(settings) as conn:
        return projection_status(conn, settings.db_schema)


def projection_status(conn: psycopg.Connection[Any], schema: str) -> list[ProjectionStatus]:
    with conn.transaction():
        head = s.store_head(conn, schema)
        rows = s.tracked(conn, schema)
    return [
        ProjectionStatus(t.name, t.version, t.position, head, max(head - t.position, 0), t.state)
        for t in rows
        if t.state != "retired"
    ]
