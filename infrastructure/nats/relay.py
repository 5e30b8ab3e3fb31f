"""The relay: publish the event store's log to JetStream in order, one active instance."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from uuid import UUID

import nats.errors
import psycopg
from eventsourcing.persistence import PersistenceError
from eventsourcing.postgres import PostgresApplicationRecorder
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from domain.workflow_run import EAGER
from infrastructure import codec
from infrastructure.bootstrap import bootstrap
from infrastructure.event_log import head, read_after
from infrastructure.metrics import RELAY_ACTIVE, RELAY_LAG, RELAY_PUBLISHED
from infrastructure.nats.connect import connect
from infrastructure.nats.names import (
    HEADER_MSG_ID,
    HEADER_ORIGINATOR_ID,
    HEADER_POSITION,
    HEADER_PREV_POSITION,
    HEADER_TRACEPARENT,
    HEADER_TYPE,
    HEADER_VERSION,
    Names,
    traceparent,
)
from infrastructure.nats.streams import StreamLimits, ensure_streams
from infrastructure.postgres.schema import PostgresParams
from infrastructure.settings import Settings
from infrastructure.telemetry.tracing import event_published
from ledgerflow._telemetry import TRACING
from projections.records import EventRecord
from services.scheduler import RUN_ENDS
from services.workflow_runs import WorkflowRuns

log = logging.getLogger("ledgerflow.relay")

HEADER_EXPECTED_LAST_MSG_ID = "Nats-Expected-Last-Msg-Id"
HEADER_EXPECTED_LAST_SEQUENCE = "Nats-Expected-Last-Sequence"

BATCH_SIZE = 500
"""Events read from the store and published (pipelined) per round trip."""
LINGER = 0.01
"""Seconds the relay waits for more events after reading a few that nobody waits for:
those of runs started eagerly (ADR 17), whose starters learn of each step and of the
end from their own commands. A busy eager run's commits then go out together."""
LINGER_BELOW = 50
"""A read of fewer events than this may linger; more go out at once."""
EAGER_RUNS_KEPT = 100_000
"""Live eager runs the relay remembers (the oldest are forgotten: their events are then
published at once, as any run's)."""
IDLE_POLL = 0.5
"""Seconds between two reads of the store when no NOTIFY arrives (a safety net)."""
STANDBY_POLL = 1.0
"""Seconds between two attempts of a standing-by relay to take the lock."""
ACK_TIMEOUT = 10.0
"""Seconds to wait for JetStream to acknowledge a published batch."""
RETRY_DELAY = 1.0
"""Seconds to wait after an error (PostgreSQL or NATS unreachable) before trying again."""


def relay_lock_key(prefix: str) -> int:
    """The advisory-lock key electing the one relay of a subject prefix (a signed bigint)."""
    digest = hashlib.blake2b(f"ledgerflow-relay:{prefix}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class RelayError(RuntimeError):
    """The relay cannot go on with its current session (it retries with a new one)."""


class PublishRejectedError(RelayError):
    """JetStream refused a message (wrong last message id, no stream, storage error...)."""


EXPECTED_ERRORS = (
    OSError,  # NatsUnavailableError included
    psycopg.OperationalError,
    PersistenceError,  # eventsourcing's wrapping of psycopg's errors
    nats.errors.Error,  # NATS timeouts, JetStream API errors
    RelayError,
)
"""What a server going away raises: logged briefly, then retried."""


@dataclass
class RelayMetrics:
    """The relay's counters, updated in place (the lag also goes to Prometheus' RELAY_LAG)."""

    state: str = "starting"
    """``starting``, ``standby`` (another relay holds the lock), ``active`` or ``stopped``."""
    published_total: int = 0
    """Messages JetStream stored (duplicates excluded)."""
    duplicates_total: int = 0
    """Messages JetStream had already (a republish after a crash or a takeover)."""
    batches_total: int = 0
    resyncs_total: int = 0
    """Times the relay re-read the stream's last message to find where to go on."""
    last_published_position: int = 0
    head_position: int = 0
    """The store's newest position, as last seen."""

    @property
    def active(self) -> bool:
        """Whether this instance holds the lock and publishes."""
        return self.state == "active"

    @property
    def lag(self) -> int:
        """Events in the store that are not on the stream yet (as last seen)."""
        return max(0, self.head_position - self.last_published_position)


@dataclass
class _Cursor:
    """Where publishing goes on: after ``position``, the message at stream sequence ``seq``.

    Right after a resync, the stream's last message id may be unknown to the server (it
    forgets it on restart once older than the duplicate window), so the first message is
    guarded by the stream sequence read then; every later one by the previous message id.
    """

    position: int
    seq: int
    resynced: bool = True


@dataclass(frozen=True)
class _Ack:
    seq: int
    duplicate: bool


class _AckInbox:
    """Pipelined JetStream publishing: write many messages, then collect their acks.

    nats-py's ``publish_async`` leaves the future of a refused message pending forever
    (its error handler raises instead of returning the error: nats-io/nats.py#985), and
    refusals are exactly what the ordering guard produces, so acks are matched here.
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._pending: dict[str, asyncio.Future[_Ack]] = {}
        self._next = 0
        self._sub: Subscription | None = None

    async def open(self) -> None:
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)

    async def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._sub is not None and not self._nc.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
        self._sub = None

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[_Ack]:
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[_Ack] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        await self._nc.publish(subject, payload, reply=f"{self._prefix}.{token}", headers=headers)
        return future

    def forget(self, futures: Sequence[asyncio.Future[_Ack]]) -> None:
        for future in futures:
            future.cancel()
        done = {token for token, future in self._pending.items() if future.done()}
        for token in done:
            del self._pending[token]

    async def _on_reply(self, msg: Msg) -> None:
        future = self._pending.pop(msg.subject.rpartition(".")[2], None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(PublishRejectedError("no stream listens on the subject"))
            return
        try:
            reply = json.loads(msg.data)
        except ValueError:
            future.set_exception(PublishRejectedError(f"unreadable ack: {msg.data[:200]!r}"))
            return
        error = reply.get("error")
        if error is not None:
            future.set_exception(
                PublishRejectedError(
                    f"{error.get('description')} (code {error.get('code')}, "
                    f"err_code {error.get('err_code')})"
                )
            )
            return
        future.set_result(
            _Ack(seq=int(reply.get("seq", 0)), duplicate=bool(reply.get("duplicate")))
        )


class _Lease:
    """The PostgreSQL session holding the relay's advisory lock, and LISTENing for inserts.

    One task reads the session's socket for as long as the lease lives: a NOTIFY sets
    ``wake``; the session ending (server gone, backend terminated) sets ``lost``, since
    PostgreSQL has then released the lock and another relay may take over.
    """

    def __init__(self, conn: psycopg.AsyncConnection[TupleRow], key: int) -> None:
        self.conn = conn
        self.key = key
        self.held = False
        self.wake = asyncio.Event()
        self.lost = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    def watch(self) -> None:
        self._watcher = asyncio.create_task(self._watch(), name="ledgerflow-relay-lease")

    async def _watch(self) -> None:
        try:
            async for _ in self.conn.notifies():
                self.wake.set()
        except psycopg.Error as e:
            log.error("lost the PostgreSQL session holding the relay lock: %s", e)
        self.lost.set()
        self.wake.set()

    async def release(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        try:
            if self.held and not self.lost.is_set() and not self.conn.closed:
                await self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        except psycopg.Error as e:
            log.debug("unlock failed (%s); closing the session releases the lock anyway", e)
        finally:
            await self.conn.close()


class Relay:
    """Publishes every event of the store to JetStream, in order, exactly once in effect.

    Many instances may run; a PostgreSQL advisory lock elects the one that publishes. The
    others stand by and take over when its session ends.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        batch_size: int = BATCH_SIZE,
        idle_poll: float = IDLE_POLL,
        linger: float = LINGER,
        standby_poll: float = STANDBY_POLL,
        ack_timeout: float = ACK_TIMEOUT,
        retry_delay: float = RETRY_DELAY,
        limits: StreamLimits | None = None,
    ) -> None:
        if not settings.uses_postgres:
            raise ValueError("the relay needs the PostgreSQL event store, not memory://")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.settings = settings
        self.batch_size = batch_size
        self.idle_poll = idle_poll
        self.linger = linger
        self.standby_poll = standby_poll
        self.ack_timeout = ack_timeout
        self.retry_delay = retry_delay
        self.limits = limits or StreamLimits.of(settings)
        self.names = Names(settings.subject_prefix)
        self.lock_key = relay_lock_key(settings.subject_prefix)
        self.metrics = RelayMetrics()

    async def run(self, stop: asyncio.Event) -> None:
        """Stand by, publish while elected, and return once ``stop`` is set.

        Servers that are down (PostgreSQL, NATS) are waited for: the relay retries every
        ``retry_delay`` seconds rather than exit.
        """
        app: WorkflowRuns | None = None
        try:
            while not stop.is_set():
                try:
                    if app is None:
                        app = await asyncio.to_thread(bootstrap, self.settings)
                    async with self._leadership(app, stop) as lease:
                        if lease is not None:
                            await self._serve(app, lease, stop)
                except EXPECTED_ERRORS as e:
                    log.warning("relay session ended: %s; retrying in %g s", e, self.retry_delay)
                    await _wait_any(stop, timeout=self.retry_delay)
                except Exception:
                    log.exception("relay session failed; retrying in %g s", self.retry_delay)
                    await _wait_any(stop, timeout=self.retry_delay)
        finally:
            self.metrics.state = "stopped"
            if app is not None:
                await asyncio.to_thread(app.close)
            log.info("relay stopped")

    # ----------------------------------------------------------------------- election
    @contextlib.asynccontextmanager
    async def _leadership(
        self, app: WorkflowRuns, stop: asyncio.Event
    ) -> AsyncIterator[_Lease | None]:
        """Hold the relay lock (None if ``stop`` was set first); LISTEN while holding it."""
        recorder = app.recorder
        if not isinstance(recorder, PostgresApplicationRecorder):
            raise RelayError("the relay needs the PostgreSQL event store")
        params = PostgresParams.from_url(self.settings.database_url)
        # Keepalives both ways, so that a silent network failure ends the session within
        # about 25 s: here, this relay stops publishing; on the server, the lock is
        # released for a standing-by relay (the server's default would take two hours).
        conninfo = make_conninfo(
            params.conninfo(),
            application_name="ledgerflow-relay",
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            options="-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5"
            " -c tcp_keepalives_count=3",
        )
        conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        lease = _Lease(conn, self.lock_key)
        try:
            if not await self._acquire(conn, stop):
                yield None
                return
            lease.held = True
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(recorder.channel_name)))
            lease.watch()
            self.metrics.state = "active"
            RELAY_ACTIVE.set(1)
            log.info("relay active for prefix %r (lock key %d)", self.names.prefix, self.lock_key)
            try:
                yield lease
            finally:
                self.metrics.state = "standby"
                RELAY_ACTIVE.set(0)
        finally:
            await lease.release()

    async def _acquire(self, conn: psycopg.AsyncConnection[TupleRow], stop: asyncio.Event) -> bool:
        said = False
        while not stop.is_set():
            cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (self.lock_key,))
            row = await cursor.fetchone()
            if row is not None and row[0] is True:
                return True
            self.metrics.state = "standby"
            if not said:
                log.info(
                    "another relay holds the lock for prefix %r: standing by", self.names.prefix
                )
                said = True
            await _wait_any(stop, timeout=self.standby_poll)
        return False

    # ----------------------------------------------------------------------- publishing
    async def _serve(self, app: WorkflowRuns, lease: _Lease, stop: asyncio.Event) -> None:
        nc = await connect(self.settings, name="ledgerflow-relay")
        inbox = _AckInbox(nc)
        try:
            js = nc.jetstream()
            await ensure_streams(js, self.names, self.limits)
            await inbox.open()
            cursor = await self._resync(js, app)
            eager = _EagerRuns()
            while not stop.is_set() and not lease.lost.is_set():
                lease.wake.clear()  # before reading: an insert from now on wakes the wait
                records, store_head = await asyncio.to_thread(self._read, app, cursor.position)
                self.metrics.head_position = max(store_head, cursor.position)
                RELAY_LAG.set(self.metrics.lag)
                if not records:
                    await _wait_any(stop, lease.wake, timeout=self.idle_poll)
                    continue
                if self.linger and len(records) < LINGER_BELOW and eager.only(records):
                    # Nobody waits for these: a few more commits can go out with them.
                    await _wait_any(stop, timeout=self.linger)
                    more, store_head = await asyncio.to_thread(
                        self._read, app, records[-1].position
                    )
                    eager.only(more)
                    records += more
                    self.metrics.head_position = max(store_head, cursor.position)
                if not await self._publish(records, cursor, inbox, lease):
                    if lease.lost.is_set():
                        log.warning("stopped publishing: the relay lock is lost")
                        break
                    cursor = await self._resync(js, app)
        finally:
            await inbox.close()
            await nc.close()

    def _read(self, app: WorkflowRuns, after: int) -> tuple[list[EventRecord], int]:
        records = read_after(app, after, self.batch_size)
        if len(records) < self.batch_size:
            # Reads see committed inserts in order (the table lock), so a short batch ends
            # at the head: no need for another query.
            return records, records[-1].position if records else after
        return records, head(app)

    async def _publish(
        self, records: list[EventRecord], cursor: _Cursor, inbox: _AckInbox, lease: _Lease
    ) -> bool:
        """Publish ``records`` pipelined, advance ``cursor`` over the stored ones.

        True when all were stored. Each message names the one before it, so JetStream
        stores none after a refused one: the stream never holds a hole or a fork.
        """
        if not await self._publish_tasks(records, inbox, lease):
            return False
        futures: list[asyncio.Future[_Ack]] = []
        for index, record in enumerate(records):
            if lease.lost.is_set():
                break  # another relay may be publishing already
            headers = self._headers(record)
            if index == 0 and cursor.resynced:
                if cursor.seq > 0:
                    headers[HEADER_EXPECTED_LAST_SEQUENCE] = str(cursor.seq)
            else:
                headers[HEADER_EXPECTED_LAST_MSG_ID] = str(record.prev_position)
            subject = self.names.event_subject(record.aggregate, record.type)
            body = codec.dumps(record.to_json())
            futures.append(await inbox.publish(subject, body, headers))
        if futures:
            await asyncio.wait(futures, timeout=self.ack_timeout)
        self.metrics.batches_total += 1
        all_stored = len(futures) == len(records)
        acked_ns = time.time_ns()
        published = 0
        for record, future in zip(records, futures, strict=False):
            if not future.done():
                log.warning(
                    "no ack for position %d within %g s",
                    record.position,
                    self.ack_timeout,
                    extra=_about(record),
                )
                all_stored = False
                break
            error = future.exception()
            if error is not None:
                log.warning(
                    "JetStream refused position %d: %s",
                    record.position,
                    error,
                    extra=_about(record),
                )
                all_stored = False
                break
            ack = future.result()
            cursor.position, cursor.seq, cursor.resynced = record.position, ack.seq, False
            self.metrics.last_published_position = record.position
            if ack.duplicate:
                self.metrics.duplicates_total += 1
                continue
            self.metrics.published_total += 1
            published += 1
            if TRACING.enabled:
                subject = self.names.event_subject(record.aggregate, record.type)
                event_published(record, subject, acked_ns)
        inbox.forget(futures)
        RELAY_PUBLISHED.labels("event").inc(published)
        log.debug(
            "published %d events up to position %d",
            len(futures),
            self.metrics.last_published_position,
            extra={"position": self.metrics.last_published_position},
        )
        return all_stored

    async def _publish_tasks(
        self, records: list[EventRecord], inbox: _AckInbox, lease: _Lease
    ) -> bool:
        """Publish the worker task of every TaskDispatched in ``records``, before the events.

        A stored TaskDispatched event thus always has its task stored: after a crash the
        batch is published again, and the task's Nats-Msg-Id makes the repeat a no-op.
        An eager start's hand-off has no task: the scheduler's lease stands for it.
        """
        futures: list[asyncio.Future[_Ack]] = []
        for record in records:
            if record.qualified_type != TASK_DISPATCHED or record.data.get("reason") == EAGER:
                continue  # an eager start is its starter's worker's (ADR 17)
            if lease.lost.is_set():
                return False
            body = codec.dumps(task_body(record))
            headers = {**self._headers(record), HEADER_MSG_ID: f"task:{record.position}"}
            subject = self.names.task(str(record.data["queue"]))
            futures.append(await inbox.publish(subject, body, headers))
        if not futures:
            return True
        await asyncio.wait(futures, timeout=self.ack_timeout)
        try:
            acks = [f.result() for f in futures if f.done() and f.exception() is None]
            RELAY_PUBLISHED.labels("task").inc(sum(1 for ack in acks if not ack.duplicate))
            stored = len(acks) == len(futures)
            if not stored:
                log.warning("a worker task was not stored; publishing the batch again")
            return stored
        finally:
            inbox.forget(futures)

    def _headers(self, record: EventRecord) -> dict[str, str]:
        return {
            HEADER_MSG_ID: str(record.position),
            HEADER_POSITION: str(record.position),
            HEADER_PREV_POSITION: str(record.prev_position),
            HEADER_ORIGINATOR_ID: str(record.originator_id),
            HEADER_VERSION: str(record.version),
            HEADER_TYPE: record.qualified_type,
            HEADER_TRACEPARENT: traceparent(record.originator_id.hex, record.position),
        }

    async def _resync(self, js: JetStreamContext, app: WorkflowRuns) -> _Cursor:
        """Where the stream ends: its last message's position (never 0 after a crash)."""
        cursor = await self._find_stream_end(js, app)
        self.metrics.resyncs_total += 1
        self.metrics.last_published_position = cursor.position
        log.info("resuming after position %d (stream sequence %d)", cursor.position, cursor.seq)
        return cursor

    async def _find_stream_end(self, js: JetStreamContext, app: WorkflowRuns) -> _Cursor:
        info = await js.stream_info(self.names.events_stream)
        state = info.state
        if state.messages == 0:
            if state.last_seq == 0:
                return _Cursor(position=0, seq=0)  # a new stream: publish the whole log
            # Purged, or every message expired: what it held is unknown. Consumers backfill
            # from the store anyway, so go on from the head rather than flood the stream.
            position = await asyncio.to_thread(head, app)
            log.warning(
                "stream %s is empty after sequence %d: going on after the store's head %d",
                self.names.events_stream,
                state.last_seq,
                position,
            )
            return _Cursor(position=position, seq=state.last_seq)
        try:
            last = await js.get_msg(self.names.events_stream, subject=self.names.events_wildcard)
        except NotFoundError:
            raise RelayError(f"stream {self.names.events_stream} lost its last message") from None
        value = (last.headers or {}).get(HEADER_POSITION)
        if value is None or not value.isdigit() or last.seq is None:
            raise RelayError(
                f"the last message of stream {self.names.events_stream} (sequence {last.seq}) "
                f"has no {HEADER_POSITION} header: was it published by something else?"
            )
        position = int(value)
        store_head = await asyncio.to_thread(head, app)
        if position > store_head:
            # Publishing would wait for positions the store may never reach, silently.
            raise RelayError(
                f"stream {self.names.events_stream} is ahead of the event store (position "
                f"{position} > head {store_head}): was the store reset, or is the subject "
                "prefix shared with another store? Delete the stream or use another prefix"
            )
        return _Cursor(position=position, seq=last.seq)


def _about(record: EventRecord) -> dict[str, object]:
    """Log fields of a line about one record."""
    return {"run_id": str(record.originator_id), "position": record.position}


async def _wait_any(*events: asyncio.Event, timeout: float) -> None:
    """Wait until one of ``events`` is set, or ``timeout`` seconds."""
    if any(event.is_set() for event in events):
        return
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


TASK_DISPATCHED = "WorkflowRun.TaskDispatched"


class _EagerRuns:
    """The live runs whose latest hand-off is eager, as the relay has read them."""

    def __init__(self) -> None:
        self._runs: dict[UUID, None] = {}

    def only(self, records: list[EventRecord]) -> bool:
        """Take note of ``records``; whether each is of a run held eagerly (then nobody
        waits for it: no task is queued for such a run, and its starter hears of its
        steps and its end from its own commands)."""
        for record in records:
            if record.qualified_type == TASK_DISPATCHED:
                if record.data.get("reason") == EAGER:
                    self._runs[record.originator_id] = None
                else:
                    self._runs.pop(record.originator_id, None)
        while len(self._runs) > EAGER_RUNS_KEPT:
            del self._runs[next(iter(self._runs))]
        held = all(record.originator_id in self._runs for record in records)
        for record in records:
            if record.qualified_type in RUN_ENDS:
                self._runs.pop(record.originator_id, None)
        return held


def task_body(record: EventRecord) -> dict[str, object]:
    """A worker task: which run, which hand-off (the fencing token), and why."""
    return {
        "run_id": str(record.originator_id),
        "dispatch": record.data["dispatch"],
        "reason": record.data["reason"],
        "queue": record.data["queue"],
        "position": record.position,
    }


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """The relay role of ``ledgerflow serve``: returns once ``stop`` is set."""
    await Relay(settings).run(stop)
