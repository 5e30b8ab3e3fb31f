"""The projections role: a durable JetStream consumer per projection keeps its read model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, ClassVar

import nats.errors
import nats.js.errors
import psycopg
from eventsourcing.persistence import PersistenceError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from psycopg_pool import ConnectionPool

from infrastructure import codec, metrics
from infrastructure.bootstrap import bootstrap
from infrastructure.event_log import read_after
from infrastructure.nats.connect import connect
from infrastructure.nats.names import Names
from infrastructure.nats.streams import STREAM_NAME_IN_USE, StreamLimits, events_config
from infrastructure.postgres import read_model_schema as s
from infrastructure.postgres.read_models import (
    READ_BATCH,
    BatchResult,
    ProjectionStatus,
    Reader,
    ReadModelsMissingError,
    apply_batches,
    catch_up,
    open_pool,
    projection_status,
)
from infrastructure.settings import Settings
from infrastructure.telemetry.runs import RunCounter, read_model_lookup
from projections.catalog import PROJECTIONS
from projections.records import EventRecord
from services.workflow_runs import WorkflowRuns

log = logging.getLogger("ledgerflow.projections")

FETCH_BATCH = 500
"""Messages fetched (and applied in one transaction) at a time."""
FETCH_TIMEOUT = 1.0
"""Seconds a fetch waits for messages; also how soon a stop is noticed when idle."""
LINGER = 0.02
"""Seconds a follower waits for more messages after a small fetch, before applying it.

At low load each event would otherwise cost its own transaction (7 round trips and a
commit): the transactions of the read models and the scheduler took CPU from the runs
themselves (docs/performance.md, optimisation log). Read models lag by at most twice this
more while the load is low; under load the batches are large and nobody waits."""
LINGER_BELOW = 50
"""A fetch of fewer messages than this lingers for more."""
RETRY_DELAY = 1.0
"""Seconds before trying again after a failure (database or NATS down, stream missing)."""
ACK_WAIT = 60.0
"""Seconds JetStream waits for an ack before redelivering (a batch takes far less)."""
BUG_DELAY = 10.0
"""Seconds before trying again after an unexpected error (it is logged with its trace)."""

LIVE_CONSUMER = "read_models"
"""The durable consumer that applies each batch to every live projection in one transaction."""

LAG_INTERVAL = 2.0
"""Seconds between two refreshes of the projection lag gauges."""

MISSING = "the read-model tables are missing: run `ledgerflow db init`"

TRANSIENT = (psycopg.Error, PersistenceError, OSError)
"""Errors of an unavailable database: wait and try again."""


def _say(error: BaseException) -> str:
    """An error's message, or its type when it has none (a bare TimeoutError)."""
    return str(error) or type(error).__name__


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Keep every projection up to date until ``stop`` is set, then finish the batch in hand.

    The projections follow one durable consumer on the events stream in lockstep (each
    batch decoded once, applied to every read model in one transaction; ADR 14), and the
    event store whenever the stream has nothing for them but the store has more (relay
    behind, stream purged or not created yet). Raises ReadModelsMissingError before
    `db init`.
    """
    names = Names(settings.subject_prefix)
    # One connection applies batches; the run counter's lookups (told of each committed
    # catch-up batch while that connection is held) and the lag gauges take the others.
    pool = await asyncio.to_thread(open_pool, settings, 3)
    app: WorkflowRuns | None = None
    try:
        positions = await asyncio.to_thread(_live_positions, pool, settings.db_schema)
        app = await asyncio.to_thread(bootstrap, settings)
        read = partial(read_after, app)
        nc = await connect(settings, name="ledgerflow-projections")
        try:
            js = nc.jetstream()
            log.info("projections following %s from %s", names.events_stream, positions)
            with contextlib.suppress(nats.errors.Error):  # else each builder tries again
                await ensure_events_stream(js, names)
            builder = ProjectionBuilder(
                LIVE_CONSUMER, settings.db_schema, names, js, pool, read, projections=positions
            )
            builder.position = min(positions.values())
            # Run-level counters: from the log, each event once.
            counter = RunCounter(read_model_lookup(pool, settings.db_schema))
            builder.observe["runs"] = counter.observe
            async with asyncio.TaskGroup() as group:
                group.create_task(builder.run(stop), name="projections")
                group.create_task(_report_lag(pool, settings.db_schema, stop), name="lag")
        finally:
            with contextlib.suppress(nats.errors.Error):
                await nc.flush(timeout=5)  # the last acks leave before the connection closes
            await nc.close()
    finally:
        if app is not None:
            await asyncio.to_thread(app.close)
        await asyncio.to_thread(pool.close)
    log.info("projections stopped")


async def _report_lag(
    pool: ConnectionPool[psycopg.Connection[Any]], schema: str, stop: asyncio.Event
) -> None:
    """Keep the lag gauges fresh, for a scrape of this process (the API reads its own)."""
    while not stop.is_set():
        try:
            found = await asyncio.to_thread(_positions, pool, schema)
        except TRANSIENT as error:
            log.debug("lag not refreshed: %s", _say(error))
        else:
            for p in found:
                metrics.STORE_HEAD.set(p.head)
                if p.state == "live":
                    metrics.PROJECTION_LAG.labels(projection=p.name).set(p.lag)
        await _pause(stop, LAG_INTERVAL)


def _positions(
    pool: ConnectionPool[psycopg.Connection[Any]], schema: str
) -> list[ProjectionStatus]:
    with pool.connection() as conn:
        return projection_status(conn, schema)


def _live_positions(pool: ConnectionPool[psycopg.Connection[Any]], schema: str) -> dict[str, int]:
    with pool.connection() as conn:
        try:
            found = {name: s.live(conn, schema, name) for name in PROJECTIONS}
        except psycopg.errors.UndefinedTable:
            raise ReadModelsMissingError(MISSING) from None
    missing = [name for name, tracked in found.items() if tracked is None]
    if missing:
        raise ReadModelsMissingError(f"{MISSING} (no live version of {', '.join(missing)})")
    return {name: tracked.position for name, tracked in found.items() if tracked is not None}


class ProjectionBuilder:
    """Projections in lockstep: fetch a batch, apply it to each with its position in one
    transaction, ack.

    Other followers of the events stream (the scheduler) subclass it and override
    ``_apply`` and ``_catch_up_if_behind_sync``.
    """

    logger: ClassVar[logging.Logger] = log

    def __init__(
        self,
        name: str,
        schema: str,
        names: Names,
        js: JetStreamContext,
        pool: ConnectionPool[psycopg.Connection[Any]],
        read: Reader,
        projections: Iterable[str] = (),
        *,
        linger: float = LINGER,
    ) -> None:
        self.name = name
        """The consumer's name (and the projection's, for one alone)."""
        self.projections = tuple(projections) or (name,)
        self.schema = schema
        self.names = names
        self.js = js
        self.pool = pool
        self.read = read
        self.durable = names.consumer(name)
        self.linger = linger
        self.position = 0
        """The last position this process saw committed by every one of its projections
        (others may be further on)."""
        self.observe: dict[str, Callable[[Sequence[EventRecord]], None]] = {}
        """By projection: told of the records each committed transaction applied to it
        (each record once)."""

    async def run(self, stop: asyncio.Event) -> None:
        subscription: JetStreamContext.PullSubscription | None = None
        while not stop.is_set():
            try:
                subscription = await self._step(subscription, stop)
            except psycopg.errors.UndefinedTable as error:
                # Not an outage: the schema is older than the code. Retrying cannot help.
                raise ReadModelsMissingError(
                    f"{self.name}: {str(error).splitlines()[0]}: run `ledgerflow db init`"
                ) from None
            except (nats.errors.Error, *TRANSIENT) as error:
                if stop.is_set():
                    break  # shutting down: connections close under the last round
                if not isinstance(error, nats.errors.Error):
                    self.logger.warning(
                        "%s: %s; retrying in %g s", self.name, _say(error), RETRY_DELAY
                    )
                    await _pause(stop, RETRY_DELAY)
                    continue
                self.logger.warning(
                    "%s: %s; subscribing again in %g s", self.name, _say(error), RETRY_DELAY
                )
                await _unsubscribe(subscription)
                subscription = None
                await _pause(stop, RETRY_DELAY)
            except Exception:
                # A bug or an unexpected record: say so loudly, keep the other projections.
                self.logger.exception("%s: failed; retrying in %g s", self.name, BUG_DELAY)
                await _pause(stop, BUG_DELAY)
        await _unsubscribe(subscription)

    async def _step(
        self, subscription: JetStreamContext.PullSubscription | None, stop: asyncio.Event
    ) -> JetStreamContext.PullSubscription | None:
        """One round: subscribe if need be, then apply one batch (or catch up when idle)."""
        if subscription is None:
            subscription = await self._subscribe()
            if subscription is None:
                await self._catch_up_if_behind()
                await _pause(stop, RETRY_DELAY)
                return None
            if not await self._has_pending():
                await self._catch_up_if_behind()
        try:
            messages = await subscription.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT)
        except TimeoutError:  # nats' own subclass, or the builtin one some fetch paths raise
            # Nothing in the stream for us: if the store has more, the relay is behind or
            # the stream was purged. The store is the truth: follow it.
            await self._catch_up_if_behind()
            return subscription
        if len(messages) < LINGER_BELOW and self.linger > 0 and not stop.is_set():
            messages = [*messages, *await self._more(subscription, FETCH_BATCH - len(messages))]
        await self._handle(messages)
        return subscription

    async def _more(self, subscription: JetStreamContext.PullSubscription, up_to: int) -> list[Msg]:
        """What else arrives within the linger (``LINGER``), to apply with a small fetch."""
        await asyncio.sleep(self.linger)
        try:
            return list(await subscription.fetch(up_to, timeout=self.linger))
        except (TimeoutError, nats.errors.Error):
            return []  # what was fetched first is applied; NATS trouble shows on the next fetch

    async def _subscribe(self) -> JetStreamContext.PullSubscription | None:
        stream = self.names.events_stream
        if not await ensure_events_stream(self.js, self.names):
            return None
        config = ConsumerConfig(
            durable_name=self.durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            filter_subject=self.names.events_wildcard,
            ack_wait=ACK_WAIT,
            max_ack_pending=FETCH_BATCH * 4,
        )
        subscription = await self.js.pull_subscribe(
            self.names.events_wildcard, durable=self.durable, stream=stream, config=config
        )
        self.logger.info("%s: consuming %s as %s", self.name, stream, self.durable)
        return subscription

    async def _has_pending(self) -> bool:
        info = await self.js.consumer_info(self.names.events_stream, self.durable)
        return bool((info.num_pending or 0) + (info.num_ack_pending or 0))

    async def _handle(self, messages: Sequence[Msg]) -> None:
        records = [r for r in map(self._decode, messages) if r is not None]
        if any(r.position > self.position for r in records):
            try:
                await asyncio.to_thread(self._apply, records)
            except Exception:
                for message in messages:
                    await message.nak(delay=RETRY_DELAY)
                raise
        for message in messages:
            await message.ack()  # after the commit: a crash before this only redelivers

    def _decode(self, message: Msg) -> EventRecord | None:
        try:
            return EventRecord.from_json(codec.loads(message.data))
        except (ValueError, KeyError, TypeError) as error:
            # Harmless: the next record's prev_position shows the gap, filled from the store.
            self.logger.warning(
                "%s: undecodable message on %s: %s", self.name, message.subject, error
            )
            return None

    def _apply(self, records: list[EventRecord]) -> None:
        with self.pool.connection() as conn:
            first = min(records, key=lambda r: r.position)
            if first.prev_position > self.position + READ_BATCH:
                # A large gap (purged stream): fill it in batches, not in one transaction.
                self._catch_up_each(conn, until=first.prev_position)
            results = apply_batches(conn, self.schema, self.projections, records, self.read)
        for result in results:
            self._committed(result)
            if result.backfilled:
                self.logger.info(
                    "%s: gap before %d: %d record(s) read from the store",
                    result.name,
                    first.position,
                    result.backfilled,
                )
        self.position = max(self.position, min(r.position for r in results))
        self.logger.debug(
            "%s: applied %s",
            self.name,
            ", ".join(f"{r.name} {r.applied} (at {r.position})" for r in results),
        )

    async def _catch_up_if_behind(self) -> None:
        await asyncio.to_thread(self._catch_up_if_behind_sync)

    def _catch_up_if_behind_sync(self) -> None:
        with self.pool.connection() as conn:
            if self.position >= s.store_head(conn, self.schema):
                return
            self._catch_up_each(conn)
            self.position = max(
                self.position, min(self._tracked(conn, name).position for name in self.projections)
            )

    def _catch_up_each(self, conn: psycopg.Connection[Any], until: int | None = None) -> None:
        """Bring each projection up to the store's head (or ``until``) from the store."""
        for name in self.projections:
            self._caught_up(
                name,
                catch_up(
                    conn, self.schema, name, self.read, until=until, committed=self._committed
                ),
            )

    def _committed(self, result: BatchResult) -> None:
        if not result.applied:
            return
        metrics.PROJECTION_APPLIED.labels(result.name).inc(result.applied)
        observe = self.observe.get(result.name)
        if observe is not None:
            try:
                observe(result.records)
            except Exception:  # telemetry must never stop a projection
                self.logger.exception("%s: counting the applied records failed", result.name)

    def _caught_up(self, name: str, applied: int) -> None:
        if applied:
            self.logger.info("%s: %d record(s) applied from the store", name, applied)

    def _tracked(self, conn: psycopg.Connection[Any], name: str) -> s.Tracked:
        tracked = s.live(conn, self.schema, name)
        if tracked is None:
            raise ReadModelsMissingError(MISSING)
        return tracked


async def ensure_events_stream(js: JetStreamContext, names: Names) -> bool:
    """Create the events stream if missing, as the relay would (never reconfigure it: that
    is the relay's business); False if it cannot be had yet (then follow the store)."""
    try:
        await js.stream_info(names.events_stream)
        return True
    except nats.js.errors.NotFoundError:
        pass
    try:
        await js.add_stream(events_config(names, StreamLimits()))
        log.info("created stream %s", names.events_stream)
        return True
    except nats.js.errors.APIError as error:
        if error.err_code == STREAM_NAME_IN_USE:
            return True  # the relay created it meanwhile, with limits of its own
        log.warning("no stream %s (%s); following the store", names.events_stream, error)
        return False


async def _unsubscribe(subscription: JetStreamContext.PullSubscription | None) -> None:
    if subscription is not None:
        with contextlib.suppress(nats.errors.Error):
            await subscription.unsubscribe()


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
