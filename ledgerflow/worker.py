"""The worker: pulls a queue's tasks and replays each run's workflow function (ADR 7)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from uuid import UUID, uuid4

from domain.errors import InvalidCommandError, InvalidStateError, StepsPendingError
from domain.ids import run_id_for
from domain.values import RetryPolicy, Timeouts
from domain.workflow_run import EAGER, EAGER_EXPIRED
from infrastructure.nats.names import traceparent
from infrastructure.settings import Settings
from ledgerflow import _transport
from ledgerflow._ports import Task, TaskQueue, Transport
from ledgerflow._telemetry import in_task_scope, task_scope
from ledgerflow.context import (
    EarlyEnd,
    HandedBack,
    Refused,
    RunContext,
    Superseded,
    Suspended,
    decode_input,
    encode,
    error_of,
    first_step,
)
from ledgerflow.errors import CommandError
from ledgerflow.flow import Flow, Workflow

log = logging.getLogger("ledgerflow.worker")

ENDED = frozenset({"completed", "failed", "cancelled"})
FETCH_TIMEOUT = 1.0
"""Seconds one fetch waits for tasks (and so how soon a stop request is noticed)."""
RETRY_DELAY = 1.0
"""Seconds before a task given back is delivered again the first time; each delivery
after that doubles it (up to MAX_RETRY_DELAY), so a run that fails the same way every
time (an output the service refuses, a bug) does not come back every second."""
MAX_RETRY_DELAY = 60.0
ANSWER_WAIT = _transport.COMMAND_TIMEOUT + 5.0
"""Seconds a stopping worker waits for the eager starts under way to be answered."""


class Outcome(StrEnum):
    ACK = "ack"  # done with this hand-off: the run ended, suspended or moved on
    NAK = "nak"  # give it back: another worker (or this one, later) takes it


@dataclass
class EagerRun:
    """What became of a run this worker took at its start (ADR 17)."""

    completed: bool = False
    output: Any = None
    """The workflow's output, when this worker completed the run."""


class Worker:
    """Serves every workflow of ``flow``, with at most ``concurrency`` tasks in hand."""

    def __init__(
        self,
        flow: Flow,
        settings: Settings,
        concurrency: int = 10,
        *,
        ack_wait: float = 30.0,
        worker_id: str | None = None,
        transport: Transport | None = None,
    ) -> None:
        """``transport`` is the embedded engine's (``ledgerflow dev``); by default the
        worker connects to NATS at ``settings.nats_url`` and closes it when it stops."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.flow = flow
        self.settings = settings
        self.concurrency = concurrency
        self.ack_wait = ack_wait
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self._working = 0  # tasks in hand, eager runs included
        self._fetching = 0  # slots reserved by the fetches under way
        self._freed = asyncio.Event()
        self._stopping = False
        self._transport: Transport | None = transport
        self._given = transport is not None
        self._in_hand: set[asyncio.Task[Any]] = set()
        self._stop: asyncio.Event | None = None
        self._reserved = 0  # eager slots taken whose start has not been answered yet
        self._answered = asyncio.Event()  # set while _reserved is 0
        self._answered.set()
        self._defined: dict[str, dict[str, Any]] = {}  # per workflow, for first_step
        self.ready = asyncio.Event()
        """Set once the workflows are registered and the queues are being pulled."""

    async def _register(self, transport: Transport, stop: asyncio.Event) -> bool:
        """Register every workflow, waiting for the command service while it is not up.

        A worker may well start before the service (a deploy, a restart): it waits,
        saying so, instead of exiting. False when stopped before the service answered.
        """
        delay, said = 0.1, False
        while not stop.is_set():
            try:
                for workflow in self.flow:
                    body = workflow.registration(self.worker_id)
                    await transport.command("register_workflow", body)
                return True
            except CommandError as e:
                if e.code != "unavailable":
                    raise
                if not said:
                    log.warning("waiting for the command service: %s", e.message)
                    said = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 2.0)
        return False

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; then hand back what is in hand and close."""
        transport = self._transport
        if transport is None or not self._given:
            transport = await _transport.connect(self.settings, f"worker-{self.worker_id}")
        self._transport = transport
        self._stop = stop
        in_hand = self._in_hand
        queues: list[TaskQueue] = []
        try:
            if not await self._register(transport, stop):
                return
            for name in self.flow.queues:
                queues.append(await transport.open_queue(name, self.ack_wait))
            log.info(
                "worker %s serves %d workflow(s) on queue(s) %s, concurrency %d",
                self.worker_id,
                len(self.flow),
                ", ".join(self.flow.queues),
                self.concurrency,
            )
            self.ready.set()
            pullers = [
                asyncio.create_task(self._pull(q, stop, in_hand), name=f"pull-{q.queue}")
                for q in queues
            ]
            await asyncio.gather(*pullers)
        finally:
            self._stopping = True
            # An eager start under way is either handed to this worker or given back
            # before the worker lets go of its runs and closes its connection.
            with contextlib.suppress(TimeoutError):  # a start gets an answer in that time
                await asyncio.wait_for(self._answered.wait(), ANSWER_WAIT)
            if in_hand:
                log.info("stopping: handing back %d run(s) in hand", len(in_hand))
                await asyncio.gather(*in_hand, return_exceptions=True)
            for queue in queues:
                await queue.close()
            if not self._given:
                await transport.close()
            log.info("worker %s stopped", self.worker_id)

    async def _pull(
        self, queue: TaskQueue, stop: asyncio.Event, in_hand: set[asyncio.Task[Any]]
    ) -> None:
        while not stop.is_set():
            free = self.concurrency - self._working - self._fetching
            if free <= 0:
                self._freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), FETCH_TIMEOUT)
                continue
            self._fetching += free  # so that other queues' pullers cannot take them
            try:
                tasks = await queue.fetch(free, FETCH_TIMEOUT)
            except Exception:
                tasks = []
                if not stop.is_set():
                    log.exception("fetching tasks from queue %s failed", queue.queue)
                    await asyncio.sleep(RETRY_DELAY)  # a backoff, not a synchronisation
            finally:
                self._fetching -= free
            keep = max(0, min(len(tasks), self.concurrency - self._working))
            for task in tasks[:keep]:
                self._working += 1
                held = in_task_scope(task, self._hold(task))  # logs and spans name the run
                job = asyncio.create_task(held, name=f"run-{task.run_id}")
                in_hand.add(job)
                job.add_done_callback(in_hand.discard)
            for task in tasks[keep:]:  # eager runs took those slots while the fetch waited
                with contextlib.suppress(Exception):
                    await task.nak()

    async def _hold(self, task: Task) -> None:
        """Process one task with a heartbeat, then ack or nak it."""
        heartbeat = asyncio.create_task(self._heartbeat(task))
        try:
            outcome = await self._process(task)
        except Exception:
            log.exception("run %s: task failed; it will be delivered again", task.run_id)
            outcome = Outcome.NAK
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self._working -= 1
            self._freed.set()
        try:
            if outcome is Outcome.ACK:
                await task.ack()
            else:
                await task.nak(None if self.stopping else retry_delay(task.deliveries))
        except Exception:
            log.warning("run %s: could not %s its task", task.run_id, outcome.value)

    @property
    def stopping(self) -> bool:
        """Told to stop: it takes no new task, and gives back what it holds at its next
        step."""
        return self._stopping or (self._stop is not None and self._stop.is_set())

    # ----------------------------------------------------------------- eager starts
    def reserve_eager(self, workflow: str) -> bool:
        """Take a slot for a run of ``workflow`` about to be started eagerly (ADR 17).

        False when this worker cannot run it at once: not serving yet, stopping, full, or
        without that workflow. After True, call :meth:`run_eager` with the start's reply,
        or :meth:`release_eager` when the start was not eager after all.
        """
        if not self.ready.is_set() or self.stopping or self._transport is None:
            return False
        # An idle worker's fetch reserves every free slot while it waits: those are free
        # still. Tasks that the fetch returns beyond the free slots go back at once.
        if self.flow.get(workflow) is None or self._working >= self.concurrency:
            return False
        self._working += 1
        self._reserved += 1
        self._answered.clear()
        return True

    def release_eager(self) -> None:
        """Give back the slot :meth:`reserve_eager` took (the start was not eager)."""
        self._free_slot()
        self._start_answered()

    def first_step(
        self, workflow: str, input: Any, key: str | None = None
    ) -> dict[str, Any] | None:
        """The step a new run of ``workflow`` would begin with, for the eager start to
        record with the run (``start_run``'s ``first_step``, ADR 20); None when it
        begins with anything else, or is not started eagerly anyway (a limited
        workflow). ``input`` is the run's, encoded as the start sends it. Call it on
        the event loop: the workflow's code runs as far as it goes without it.

        A keyed run's id is known before its start. Any other run's is not: the
        workflow is probed under two provisional ids, and a step whose name depends on
        the id (the two differ) is not begun by the start.
        """
        found = self.flow.get(workflow)
        if found is None or (found.concurrency is not None and found.concurrency.limit):
            return None
        wf = found
        defined = self._defined.get(workflow)
        if defined is None:
            defined = self._defined[workflow] = _defined(wf)

        def probe(run_id: UUID) -> dict[str, Any] | None:
            snapshot = _fresh_snapshot(defined, str(run_id), input, key)
            return first_step(lambda ctx: self._call(wf, ctx, snapshot), snapshot)

        if key is not None:
            return probe(run_id_for(workflow, key))
        step = probe(uuid4())
        return step if step is not None and probe(uuid4()) == step else None

    def run_eager(
        self, run: dict[str, Any], cause: int, started: str | None = None
    ) -> asyncio.Task[EagerRun]:
        """Run an eager start on the slot :meth:`reserve_eager` took: ``run`` is the
        snapshot in the start's reply, ``cause`` the reply's position (its hand-off),
        ``started`` the ``first_step`` the start was asked to record (ADR 20)."""
        job = asyncio.create_task(self._eager(run, cause, started), name=f"eager-{run['run_id']}")
        self._in_hand.add(job)
        job.add_done_callback(self._in_hand.discard)
        job.add_done_callback(lambda _: self._free_slot())  # even if cancelled unstarted
        self._start_answered()
        return job

    def _free_slot(self) -> None:
        self._working -= 1
        self._freed.set()

    def _start_answered(self) -> None:
        self._reserved -= 1
        if not self._reserved:
            self._answered.set()

    async def _eager(self, run: dict[str, Any], cause: int, started: str | None) -> EagerRun:
        """Hold the run (the scheduler asks before it takes it away) and replay it. A run
        given back goes to its queue at once; if even that is not heard, the scheduler
        sends it there when the lease runs out."""
        assert self._transport is not None
        run_id, dispatch, ended = str(run["run_id"]), int(run["dispatch"]), EagerRun()
        scope = task_scope(
            run_id, cause, traceparent(UUID(run_id).hex, cause), dispatch=dispatch, reason=EAGER
        )
        with scope:
            try:
                async with self._transport.hold(run_id):
                    outcome = await self._replay(run, dispatch, EAGER, ended, started)
            except Exception:
                log.exception("run %s: the eager run failed; it goes to its queue", run_id)
                outcome = Outcome.NAK
            if outcome is Outcome.NAK:
                body = {"run_id": run_id, "reason": EAGER_EXPIRED, "cause": cause}
                try:
                    await self._send("dispatch_run", body)
                except Exception as e:
                    log.warning("run %s: not handed to its queue yet (%s)", run_id, e)
        return ended

    async def _heartbeat(self, task: Task) -> None:
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            with contextlib.suppress(Exception):
                await task.in_progress()

    # ---------------------------------------------------------------------- one task
    async def _process(self, task: Task) -> Outcome:
        if task.reason == EAGER:
            # Only a relay older than ADR 17 queues an eager hand-off: its starter's
            # worker runs it, and the scheduler's lease stands in for this task.
            log.warning("run %s: an eager hand-off was queued; it is its starter's", task.run_id)
            return Outcome.ACK
        run = await self._load(task.run_id)
        if run["status"] in ENDED:
            log.debug("run %s has ended (%s): task dropped", task.run_id, run["status"])
            return Outcome.ACK
        if run["dispatch"] > task.dispatch:
            log.debug("run %s: dispatch %d is stale", task.run_id, task.dispatch)
            return Outcome.ACK
        return await self._replay(run, task.dispatch, task.reason)

    async def _replay(
        self,
        run: dict[str, Any],
        dispatch: int,
        reason: str,
        ended: EagerRun | None = None,
        started: str | None = None,
    ) -> Outcome:
        """Replay ``run`` under hand-off ``dispatch``: ACK when this hand-off is done with,
        NAK to give it back. ``ended`` learns the output of a run this replay completes;
        ``started`` names the step its eager start began (ADR 20)."""
        run_id = run["run_id"]
        workflow = self.flow.get(run["workflow"])
        if workflow is None:
            log.error("run %s: this worker has no workflow %r", run_id, run["workflow"])
            return Outcome.NAK
        if run["status"] == "compensating":
            return await self._compensate(workflow, run)
        log.info("run %s (%s): replaying (%s)", run_id, workflow.name, reason)
        ctx = RunContext(
            run,
            self._send,
            dispatch,
            stopping=lambda: self.stopping,
            reason=reason,
            started=started,
        )
        ending: EarlyEnd | None = None
        try:
            try:
                output = await self._call(workflow, ctx, run)
                ending = _early_end(ctx, output)
            finally:
                try:
                    await ctx.settled()
                except BaseException:
                    if ending is not None:  # refused too (its steps did not complete)
                        await asyncio.wait([ending.reply])
                        _ = ending.reply.cancelled() or ending.reply.exception()
                    raise
        except Suspended as why:
            log.info("run %s: suspended (%s)", run_id, why)
            return Outcome.ACK
        except HandedBack:
            log.info("run %s: handed back", run_id)
            return Outcome.NAK
        except Superseded:
            log.info("run %s: handed off again; letting go", run_id)
            return Outcome.ACK
        except Refused as why:
            log.info("run %s: refused new work (%s)", run_id, why)
            return await self._after_refusal(workflow, ctx)
        except Exception as e:
            log.info("run %s: failed with %s: %s", run_id, type(e).__name__, e)
            await self._send("fail_run", {"run_id": run_id, "error": error_of(e)})
            return Outcome.ACK  # any compensation is the next dispatch's (see _compensate)
        return await self._complete_run(ctx, output, ending, ended)

    async def _complete_run(
        self, ctx: RunContext, output: Any, ending: EarlyEnd | None, ended: EagerRun | None = None
    ) -> Outcome:
        """The run's end, guarded by every step this replay completed (ADR 16): the one
        sent behind the last completions, else (or again, when it came before a
        completion was applied) ``complete_run`` now. ``ended`` learns the output when
        this call is what completed the run."""
        body = ending.body if ending is not None else ctx.end_body(encode(output))
        try:
            if ending is not None:
                try:
                    _learn(ended, await ending.reply, body)
                    return _completed(ctx.run_id)
                except InvalidStateError as e:
                    if e.reason != StepsPendingError.reason:
                        raise
            _learn(ended, await self._send("complete_run", body), body)
        except InvalidStateError as e:
            if e.reason != StepsPendingError.reason:
                raise
            # The completions are answered, and a step this replay completed has not
            # completed: its completion changed nothing (another worker's attempt had
            # failed it, or it is being retried). The run must not complete past it: a
            # replay meets the step as it stands.
            log.warning("run %s: %s; handing the run back", ctx.run_id, e)
            return Outcome.NAK
        except InvalidCommandError:
            # A command service older than ADR 16 knows no after_steps. (An output it
            # refuses for good is refused again here, and the task goes back.)
            unguarded = {k: v for k, v in body.items() if k != "after_steps"}
            _learn(ended, await self._send("complete_run", unguarded), body)
        return _completed(ctx.run_id)

    async def _call(self, workflow: Workflow, ctx: RunContext, run: dict[str, Any]) -> Any:
        fn: Any = workflow.fn
        if not workflow.takes_input:
            return await fn(ctx)
        return await fn(ctx, decode_input(run["input"], workflow.input_type))

    async def _after_refusal(self, workflow: Workflow, ctx: RunContext) -> Outcome:
        run = await ctx.reload()
        if run["status"] not in ENDED and run["status"] != "compensating":
            log.warning("run %s is %s but refused new work", ctx.run_id, run["status"])
        return Outcome.ACK  # any compensation is the next dispatch's (see _compensate)

    async def _compensate(self, workflow: Workflow, run: dict[str, Any]) -> Outcome:
        """A run already compensating: replay only to learn its compensations, then run them.

        Only the task dispatched after compensation began (the scheduler dispatches on
        CompensationStarted) gets here with the latest dispatch; the task that failed or
        cancelled the run leaves it alone. So each compensation runs once, and again only
        when its worker dies midway (a redelivery of this same task).
        """
        ctx = RunContext(run, self._send, replay_only=True)
        try:
            try:
                await self._call(workflow, ctx, run)
            finally:
                await ctx.settled()
        except (Exception, Suspended, Refused):
            pass  # only the compensations it registered matter
        return await self._run_compensations(ctx, run)

    async def _run_compensations(self, ctx: RunContext, run: dict[str, Any]) -> Outcome:
        """Undo the completed compensable steps, latest first, each recorded once."""
        for step in run["compensations_pending"]:
            compensation = ctx.compensations.get(step)
            if compensation is None:
                log.error("run %s: no compensation registered for step %r", ctx.run_id, step)
                return Outcome.ACK
            log.info("run %s: compensating step %r", ctx.run_id, step)
            result = compensation.fn(compensation.output)
            if inspect.isawaitable(result):
                await result
            await self._send("compensate_step", {"run_id": ctx.run_id, "step": step})
        return Outcome.ACK

    async def _load(self, run_id: str) -> dict[str, Any]:
        reply = await self._send("load_run", {"run_id": run_id})
        run: dict[str, Any] = reply["run"]
        return run

    async def _send(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self._transport is not None
        return await self._transport.command(name, body)


def _fresh_snapshot(
    defined: dict[str, Any], run_id: str, input: Any, key: str | None
) -> dict[str, Any]:
    """A new run's snapshot as ``load_run`` would give it before its first step: what
    the workflow's code may observe before its first operation (ADR 20). ``defined`` is
    what its workflow's definition sets (:func:`_defined`)."""
    return {
        **defined,
        "run_id": run_id,
        "key": key,
        "input": input,
        "steps": {},
        "sleeps": {},
        "waits": {},
        "children": {},
        "sent_events": {},
        "compensations_pending": [],
    }


def _defined(workflow: Workflow) -> dict[str, Any]:
    """The parts of a new run's snapshot that its workflow's definition sets."""
    registered = workflow.registration()
    return {
        "workflow": workflow.name,
        "status": "queued",
        "version": 2,
        "dispatch": 1,
        "retry_policy": registered.get("retry_policy") or RetryPolicy().to_json(),
        "timeouts": registered.get("timeouts") or Timeouts().to_json(),
        "parent_run_id": None,
        "cancel_requested": False,
        "error": None,
        "output": None,
    }


def _learn(ended: EagerRun | None, reply: dict[str, Any], body: dict[str, Any]) -> None:
    """An eager run's output, as the store has it, when this ``complete_run`` completed
    the run. A run completed by another holder meanwhile (it was handed off) has that
    holder's output, which only the store knows."""
    if ended is not None and reply.get("completed_now", True):
        ended.completed, ended.output = True, body["output"]


def _completed(run_id: str) -> Outcome:
    log.info("run %s: completed", run_id)
    return Outcome.ACK


def _early_end(ctx: RunContext, output: Any) -> EarlyEnd | None:
    """The run's end sent at once behind its completions (ADR 16), when it can be. An
    output that cannot be encoded is left to ``complete_run``, which raises it outside
    the workflow's error handling, as before."""
    try:
        encoded = encode(output)
    except Exception:
        return None
    return ctx.end_after_completions(encoded)


def retry_delay(deliveries: int) -> float:
    """Seconds before a task given back after its ``deliveries``-th delivery comes again."""
    doublings = max(0, min(deliveries, 32) - 1)
    return float(min(RETRY_DELAY * (1 << doublings), MAX_RETRY_DELAY))
