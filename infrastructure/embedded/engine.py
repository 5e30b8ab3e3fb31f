"""The embedded engine: ledgerflow in one process, for ``ledgerflow dev`` (ADR 12).

The same domain, command handlers, projections and scheduler as ``ledgerflow serve``, on
an embedded store (SQLite, through eventsourcing) with in-process delivery in place of
NATS. The store stays the one source of truth: on start the engine reads the whole log
into its in-memory read models and scheduler, then follows the log as commands append
to it. What the relay does over JetStream (hand a TaskDispatched to its worker queue,
tell a waiting client that its run ended) happens here in the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from eventsourcing.persistence import PersistenceError

from domain.values import JSON
from domain.workflow_run import EAGER
from infrastructure.bootstrap import bootstrap, init_database
from infrastructure.event_log import read_after
from infrastructure.nats.command_service import (
    CommandError,
    error_body,
    parse_command,
    reply_body,
)
from infrastructure.nats.names import traceparent
from infrastructure.nats.relay import TASK_DISPATCHED
from infrastructure.settings import Settings
from infrastructure.telemetry.runs import RunCounter
from projections.memory import InMemoryReadModels
from projections.records import EventRecord
from services import commands as c
from services.clock import Clock, SystemClock
from services.scheduler import RUN_ENDS, Lease, MemorySchedulerView, Scheduler
from services.workflow_runs import WorkflowRuns

log = logging.getLogger("ledgerflow.engine")

READ_BATCH = 1000
"""Events read from the store at a time."""
MAX_TIMER_SLEEP = 0.1
"""Seconds the timer loop sleeps at most: how soon it notices a clock that jumps."""


@dataclass
class _Pending:
    command: c.Command
    reply: asyncio.Future[dict[str, JSON]] | None  # None: the engine's own (scheduler, timers)


@dataclass
class Delivery:
    """A task in an embedded queue: the same fields and verbs as a JetStream task message."""

    run_id: str
    dispatch: int
    reason: str
    queue: str
    position: int
    _queue: EmbeddedQueue = field(repr=False)
    traceparent: str | None = None
    deliveries: int = 1
    _redeliver: asyncio.TimerHandle | None = field(default=None, repr=False)
    _settled: bool = field(default=False, repr=False)

    async def ack(self) -> None:
        self._settle()

    async def nak(self, delay: float | None = None) -> None:
        if self._settled:
            return  # delivered again already (ack_wait ran out): one copy is enough
        self._settle()
        self._queue.put_later(self._again(), delay or 0.0)

    async def in_progress(self) -> None:
        if not self._settled:
            self._arm()

    def _arm(self) -> None:
        if self._redeliver is not None:
            self._redeliver.cancel()
        loop = asyncio.get_running_loop()
        self._redeliver = loop.call_later(self._queue.ack_wait, self._expired)

    def _expired(self) -> None:
        if not self._settled:
            log.warning("run %s: task not acknowledged in time; delivering again", self.run_id)
            self._settle()
            self._queue.put(self._again())

    def _settle(self) -> None:
        self._settled = True
        if self._redeliver is not None:
            self._redeliver.cancel()
            self._redeliver = None

    def _again(self) -> Delivery:
        return Delivery(
            self.run_id,
            self.dispatch,
            self.reason,
            self.queue,
            self.position,
            self._queue,
            self.traceparent,
            self.deliveries + 1,
        )


class EmbeddedQueue:
    """A worker queue in memory: tasks wait here until a worker fetches them."""

    def __init__(self, queue: str, ack_wait: float = 30.0) -> None:
        self.queue = queue
        self.ack_wait = ack_wait
        self._ready: asyncio.Queue[Delivery] = asyncio.Queue()

    def put(self, task: Delivery) -> None:
        self._ready.put_nowait(task)

    def put_later(self, task: Delivery, delay: float) -> None:
        if delay <= 0:
            self.put(task)
        else:
            asyncio.get_running_loop().call_later(delay, self.put, task)

    async def fetch(self, count: int, timeout: float) -> list[Any]:
        try:
            first = await asyncio.wait_for(self._ready.get(), timeout)
        except TimeoutError:
            return []
        tasks = [first]
        while len(tasks) < count and not self._ready.empty():
            tasks.append(self._ready.get_nowait())
        for task in tasks:
            task._arm()
        return tasks

    async def close(self) -> None:
        """Workers come and go; the queue (and what waits in it) stays with the engine."""

    def __len__(self) -> int:
        return self._ready.qsize()


class Engine:
    """One process's whole ledgerflow: commands, store, read models, scheduler, queues."""

    def __init__(
        self, settings: Settings, *, clock: Clock | None = None, max_batch: int | None = None
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.max_batch = max_batch or settings.max_command_batch
        self.app: WorkflowRuns | None = None
        self.read_models = InMemoryReadModels()
        self.position = 0
        """Position of the last event the read models, scheduler and queues have seen."""
        self.generation = 1
        """Which build of the read models is live: each rebuild swaps in the next one."""
        self._scheduler_view = MemorySchedulerView()
        self._eager_lease = timedelta(seconds=settings.eager_lease_seconds)
        self._scheduler = Scheduler(self._scheduler_view, self._eager_lease)
        self._holders: Counter[UUID] = Counter()  # eager runs held in this process (ADR 17)
        self._queues: dict[str, EmbeddedQueue] = {}
        self._open: dict[UUID, EventRecord] = {}  # the latest TaskDispatched of live runs
        self._ends: defaultdict[UUID, set[asyncio.Event]] = defaultdict(set)
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._timers_changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._rebuilding = asyncio.Lock()
        self._counter = RunCounter(self._known_runs)  # the run metrics, as projections count

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Open the store (creating it on first use), read the log, start the loops."""
        init = await asyncio.to_thread(init_database, self.settings)
        if init:
            log.info("embedded store created at %s", self.settings.sqlite_path)
        self.app = await asyncio.to_thread(bootstrap, self.settings, clock=self.clock)
        started = time.perf_counter()
        commands = await self._follow(live=False)
        for record in self._open.values():  # hand-offs in flight when the process stopped
            self._deliver_task(record)
        now = self.clock.now()
        for lease in list(self._scheduler_view.leases.values()):
            # Eager runs of the process that stopped: nothing here holds them yet.
            self._scheduler_view.put_lease(Lease(lease.run_id, now, lease.cause))
        log.info(
            "read %d event(s) from the embedded store in %.2f s",
            self.position,
            time.perf_counter() - started,
        )
        self._submit(commands)  # idempotent: what a crash may have left undone
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="engine-writes"),
            asyncio.create_task(self._timer_loop(), name="engine-timers"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self.app is not None:
            await asyncio.to_thread(self.app.close)
            self.app = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Engine]:
        await self.start()
        try:
            yield self
        finally:
            await self.close()

    @property
    def store(self) -> WorkflowRuns:
        if self.app is None:
            raise RuntimeError("the engine is not started")
        return self.app

    # -------------------------------------------------------------------- commands
    async def send(self, name: str, payload: bytes) -> dict[str, JSON]:
        """The reply body to command ``name`` (a refusal is an error body, never raised)."""
        try:
            command = parse_command(name, payload, self.settings.max_command_bytes)
        except CommandError as e:
            return error_body(e.code, e.message, e.details)
        return await self.execute(command)

    async def execute(self, command: c.Command) -> dict[str, JSON]:
        reply: asyncio.Future[dict[str, JSON]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(command, reply))
        self._wake.set()
        return await reply

    def _submit(self, commands: Iterable[c.Command]) -> None:
        self._pending.extend(_Pending(command, None) for command in commands)
        if self._pending:
            self._wake.set()

    async def _write_loop(self) -> None:
        """Apply whatever has queued up as one batch (group commit), then follow the log."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                bodies = await self._apply(batch)
                for pending, body in zip(batch, bodies, strict=True):
                    if pending.reply is not None and not pending.reply.done():
                        pending.reply.set_result(body)
                    elif pending.reply is None and not body.get("ok"):
                        log.debug("%s refused: %s", type(pending.command).__name__, body)
                self._submit(await self._follow(live=True))

    async def _apply(self, batch: Sequence[_Pending]) -> list[dict[str, JSON]]:
        try:
            results = await asyncio.to_thread(self.store.execute, [p.command for p in batch])
        except PersistenceError as e:
            log.warning("embedded store unavailable: %s", e)
            return [error_body("unavailable", f"the event store is unavailable: {e}")] * len(batch)
        except Exception:
            log.exception("batch of %d commands failed", len(batch))
            return [error_body("internal", "internal error; nothing was applied")] * len(batch)
        return [reply_body(result) for result in results]

    # ------------------------------------------------------------- following the log
    async def _follow(self, *, live: bool) -> list[c.Command]:
        """Apply every new event to the read models, scheduler and queues; what the
        scheduler decided to do about them."""
        commands: list[c.Command] = []
        while True:
            records = await asyncio.to_thread(read_after, self.store, self.position, READ_BATCH)
            if not records:
                break
            for record in records:
                commands.extend(self._see(record, live=live))
            if live:  # history read back at start was counted by the process that wrote it
                self._counter.observe(records)
            self.position = records[-1].position
            if len(records) < READ_BATCH:
                break
        return commands

    def _see(self, record: EventRecord, *, live: bool) -> list[c.Command]:
        self.read_models.apply_all([record], self._backfill)
        timers = len(self._scheduler_view.timers)
        commands = self._scheduler.process(record)
        if len(self._scheduler_view.timers) != timers:
            self._timers_changed.set()
        kind = record.qualified_type
        if kind == TASK_DISPATCHED:
            self._open[record.originator_id] = record
            if live:
                self._deliver_task(record)
        elif kind in RUN_ENDS:
            self._open.pop(record.originator_id, None)
            for ended in self._ends.pop(record.originator_id, ()):
                ended.set()
        return commands

    def _known_runs(self, run_ids: Collection[UUID]) -> dict[UUID, tuple[str, datetime]]:
        rows = self.read_models.views.runs
        return {i: (rows[i].workflow, rows[i].created_at) for i in run_ids if i in rows}

    def _backfill(self, after: int, until: int) -> list[EventRecord]:
        # Records come straight from the store in order: there is never a gap to fill.
        return [r for r in read_after(self.store, after, until - after) if r.position <= until]

    def _deliver_task(self, record: EventRecord) -> None:
        if record.data.get("reason") == EAGER:
            return  # its starter's worker holds it; the lease timer minds it (ADR 17)
        queue = self.queue(str(record.data["queue"]))
        queue.put(
            Delivery(
                run_id=str(record.originator_id),
                dispatch=int(str(record.data["dispatch"])),
                reason=str(record.data["reason"]),
                queue=queue.queue,
                position=record.position,
                _queue=queue,
                traceparent=traceparent(record.originator_id.hex, record.position),
            )
        )

    def queue(self, name: str) -> EmbeddedQueue:
        if name not in self._queues:
            self._queues[name] = EmbeddedQueue(name)
        return self._queues[name]

    # ----------------------------------------------------------------------- timers
    async def _timer_loop(self) -> None:
        while True:
            now = self.clock.now()
            view = self._scheduler_view
            due = sorted((t for t in view.timers.values() if t.due_at <= now), key=_due)
            for timer in due:
                view.delete_timer(timer.run_id, timer.kind, timer.name)
            self._submit(timer.command() for timer in due)
            self._submit(self._settle_leases(now))
            upcoming = [t.due_at for t in view.timers.values()]
            upcoming += [lease.due_at for lease in view.leases.values()]
            wait = MAX_TIMER_SLEEP
            if upcoming:
                wait = max(0.0, min(wait, (min(upcoming) - now).total_seconds()))
            self._timers_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timers_changed.wait(), wait)

    def _settle_leases(self, now: datetime) -> list[c.Command]:
        """Each due lease of an eager run (ADR 17): a holder in this process keeps it,
        and any other run goes to its queue. With no network between the holder and
        the engine, a holder that is not here is gone: there is no grace to give."""
        view = self._scheduler_view
        commands: list[c.Command] = []
        for lease in [lease for lease in view.leases.values() if lease.due_at <= now]:
            if self._holders[lease.run_id]:
                view.put_lease(Lease(lease.run_id, now + self._eager_lease, lease.cause))
            else:
                del view.leases[lease.run_id]
                commands.append(lease.command())
        return commands

    @contextlib.asynccontextmanager
    async def hold(self, run_id: str) -> AsyncIterator[None]:
        """This process holds an eager run while entered (ADR 17)."""
        key = UUID(run_id)
        self._holders[key] += 1
        try:
            yield
        finally:
            self._holders[key] -= 1
            if not self._holders[key]:
                del self._holders[key]

    # ------------------------------------------------------------------ run endings
    @contextlib.asynccontextmanager
    async def run_ends(self, run_id: str) -> AsyncIterator[asyncio.Event]:
        ended = asyncio.Event()
        key = UUID(run_id)
        self._ends[key].add(ended)
        try:
            yield ended
        finally:
            waiting = self._ends.get(key)
            if waiting is not None:
                waiting.discard(ended)
                if not waiting:
                    del self._ends[key]

    # --------------------------------------------------------------------- rebuilds
    async def rebuild(self) -> int:
        """Read the whole log into fresh read models and swap them in; events read."""
        async with self._rebuilding:
            fresh = InMemoryReadModels()
            after = 0
            while True:
                records = await asyncio.to_thread(read_after, self.store, after, READ_BATCH)
                if not records:
                    break
                fresh.apply_all(records, self._backfill)
                after = records[-1].position
            # Events appended meanwhile: the live models saw them, so must the fresh ones.
            while after < self.position:
                records = await asyncio.to_thread(read_after, self.store, after, READ_BATCH)
                if not records:
                    break
                fresh.apply_all([r for r in records if r.position <= self.position], self._backfill)
                after = records[-1].position
            self.read_models = fresh
            self.generation += 1
            return after


def _due(timer: Any) -> Any:
    return timer.due_at
