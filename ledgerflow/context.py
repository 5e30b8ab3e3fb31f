"""RunContext: what workflow code calls; replays a run's recorded history, records the rest."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar, overload

import pydantic_core
from pydantic import BaseModel, TypeAdapter

from domain.errors import InvalidCommandError, InvalidStateError
from domain.values import RetryPolicy, check_step_name
from ledgerflow._telemetry import step_attempt
from ledgerflow.errors import (
    ChildFailedError,
    CommandError,
    NonRetryableError,
    StepFailedError,
    is_superseded,
)
from ledgerflow.flow import type_hints, workflow_name

log = logging.getLogger("ledgerflow.context")
T = TypeVar("T")
MAX_ERROR_MESSAGE = 10_000
MAX_TRACEBACK = 20_000
"""Characters of a failure's traceback kept with it (its end: where it was raised)."""
CLOCK_SKEW = timedelta(seconds=1)
"""How far this worker's clock may lag the scheduler's when it decides a retry is due."""


class Commands(Protocol):
    """Sends one command by its wire name; returns the reply, raises the refusal."""

    def __call__(self, name: str, body: dict[str, Any]) -> Awaitable[dict[str, Any]]: ...


class Interrupt(BaseException):
    """Leaves the workflow function (a BaseException, so ``except Exception`` cannot eat it)."""


class Suspended(Interrupt):
    """The run waits (sleep, event, child, retry): the scheduler dispatches it again."""


class HandedBack(Interrupt):
    """The task goes back to the queue for another worker (or a later try): the worker
    is stopping, or a command of the run got no answer."""


class Superseded(Interrupt):
    """The run was handed off again: this task is stale and lets go."""


class Refused(Interrupt):
    """The run takes no new work any more (cancelled, compensating or ended)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class EarlyEnd:
    """A ``complete_run`` sent behind unanswered completions (ADR 16): its body, and its
    reply to come."""

    body: dict[str, Any]
    reply: asyncio.Future[dict[str, Any]]


@dataclass(frozen=True)
class Compensation:
    step: str
    fn: Callable[[Any], Any]
    output: Any


def encode(value: Any) -> Any:
    """A JSON value for the store: pydantic models are dumped in JSON mode."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return pydantic_core.to_jsonable_python(value)


def decode(value: Any, annotation: Any) -> Any:
    """A recorded JSON value as the annotated type, when that is a pydantic model."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.model_validate(value)
    return value


def decode_input(value: Any, annotation: Any) -> Any:
    """A run's input validated against the workflow function's parameter annotation."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    try:
        adapter = _adapter(annotation)
    except TypeError:  # an unhashable annotation: nothing to key a cache on
        adapter = TypeAdapter(annotation)
    return adapter.validate_python(value)


@functools.lru_cache(maxsize=256)
def _adapter(annotation: Any) -> TypeAdapter[Any]:
    """One validator per annotation: building one costs far more than validating."""
    return TypeAdapter(annotation)


class StepTimeout(Exception):  # noqa: N818 - its name is the recorded error type
    """An attempt ran longer than its step timeout (recorded as error type ``StepTimeout``)."""

    def __init__(self, step: str, seconds: float) -> None:
        super().__init__(f"step {step!r} took longer than {seconds:g} s")
        self.step = step
        self.seconds = seconds


def step_timeout(own: timedelta | None, snapshot: dict[str, Any]) -> float | None:
    """Seconds an attempt may take: the step's own timeout, else the workflow's, else None."""
    if own is not None:
        seconds = own.total_seconds()
        if seconds <= 0:
            raise ValueError("a step timeout must be above 0")
        return seconds
    timeouts = snapshot.get("timeouts") or {}
    default = timeouts.get("step")
    return float(default) if default is not None else None


async def _attempt(
    name: str, fn: Callable[..., Any], args: tuple[Any, ...], limit: float | None
) -> Any:
    """One attempt of a step; StepTimeout when it takes longer than ``limit`` seconds.

    A sync function always runs in a thread, so the event loop keeps heartbeating the
    task however long the step takes (a blocked loop would lose the task, and another
    worker would run the step a second time while this one still runs it).
    """
    if inspect.iscoroutinefunction(fn):
        return await _within(name, fn(*args), limit)
    # Python cannot kill a thread: on timeout the function keeps running there.
    value = await _within(name, asyncio.to_thread(fn, *args), limit)
    if inspect.isawaitable(value):  # a sync callable that returned an awaitable
        value = await _within(name, value, limit)
    return value


async def _within(name: str, awaitable: Awaitable[Any], limit: float | None) -> Any:
    return await (awaitable if limit is None else _bounded(name, awaitable, limit))


async def _bounded(name: str, awaitable: Awaitable[Any], limit: float) -> Any:
    """``awaitable``'s result, or StepTimeout (after cancelling it) past ``limit`` seconds.

    Not ``asyncio.wait_for``: a TimeoutError the step itself raises stays its own failure.
    """
    work = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({work}, timeout=limit)
    except BaseException:  # this replay itself was cancelled
        work.cancel()
        raise
    if work not in done:
        work.cancel()  # an async fn is cancelled; a thread is only no longer awaited
        await asyncio.wait({work})
        raise StepTimeout(name, limit)
    return work.result()


def _outcome(exc: Exception) -> str:
    """A failed attempt's outcome, as the step metrics count it."""
    if isinstance(exc, StepTimeout):
        return "timed_out"
    if isinstance(exc, NonRetryableError):
        return "non_retryable"
    return "failed"


def error_of(exc: BaseException) -> dict[str, str]:
    """The error a failed step or run records: its type, message and traceback."""
    error = {"type": type(exc).__name__, "message": str(exc)[:MAX_ERROR_MESSAGE]}
    trace = "".join(traceback.format_exception(exc))
    if len(trace) > MAX_TRACEBACK:
        trace = "...\n" + trace[-MAX_TRACEBACK:]
    error["traceback"] = trace
    return error


class RunContext:
    """One replay of a run: recorded outcomes are returned, new work is recorded first.

    ``snapshot`` is the ``load_run`` reply's ``run``; ``dispatch`` the task's hand-off.
    With ``replay_only`` nothing new is recorded: the first new operation suspends (used to
    collect the compensations of a run that is already compensating).
    """

    def __init__(
        self,
        snapshot: dict[str, Any],
        send: Commands,
        dispatch: int | None = None,
        *,
        replay_only: bool = False,
        stopping: Callable[[], bool] = lambda: False,
        reason: str = "",
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        started: str | None = None,
    ) -> None:
        """``started`` names the step whose first attempt the run's eager start recorded
        for this replay to run (ADR 20)."""
        self.snapshot = snapshot
        self.run_id: str = snapshot["run_id"]
        self.workflow: str = snapshot["workflow"]
        self._send = send
        self._dispatch = dispatch
        self._replay_only = replay_only
        self._stopping = stopping
        self._reason = reason
        self._now = now
        self.compensations: dict[str, Compensation] = {}
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._completing: list[asyncio.Future[dict[str, Any]]] = []
        self.completed_steps: list[str] = []
        """Every step whose completion this replay sent, in order (ADR 16's guard)."""
        self._started = started

    def idempotency_key(self, step: str) -> str:
        """A step's stable key, the same on every attempt: pass it to external services."""
        return f"{self.run_id}:{step}"

    # ------------------------------------------------------------------------- steps
    @overload
    async def step(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        retry: RetryPolicy | None = None,
        compensate: Callable[[T], Any] | None = None,
        timeout: timedelta | None = None,
    ) -> T: ...

    @overload
    async def step(
        self,
        name: str,
        fn: Callable[..., T],
        *args: Any,
        retry: RetryPolicy | None = None,
        compensate: Callable[[T], Any] | None = None,
        timeout: timedelta | None = None,
    ) -> T: ...

    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        retry: RetryPolicy | None = None,
        compensate: Callable[[Any], Any] | None = None,
        timeout: timedelta | None = None,
    ) -> Any:
        """Run ``fn(*args)`` once for good: a completed step returns its recorded output.

        ``timeout`` bounds each attempt (else the workflow's ``step_timeout``, if any). An
        attempt that takes longer is abandoned and recorded as failed with a ``StepTimeout``
        error, which the retry policy retries like any other failure. An async ``fn`` is
        cancelled. A sync ``fn`` with a timeout runs in a thread, and Python cannot kill a
        thread: the worker only stops waiting for it, so it keeps running in the background
        and may still have its effects after the attempt was recorded as failed (and while
        the next attempt runs). Make such functions idempotent, e.g. with
        :meth:`idempotency_key`. Without a timeout a sync ``fn`` runs inline, as before.
        """
        self._inflight += 1
        self._idle.clear()
        try:
            return await self._step(name, fn, args, retry, compensate, timeout)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _step(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        retry: RetryPolicy | None,
        compensate: Callable[[Any], Any] | None,
        timeout: timedelta | None = None,
    ) -> Any:
        returns = type_hints(fn).get("return")
        state = self.snapshot["steps"].get(name)
        status = state["status"] if state else "pending"
        if status in ("completed", "compensated"):
            output = decode(state["output"], returns)
            if compensate is not None and status == "completed":
                self.compensations[name] = Compensation(name, compensate, output)
            return output
        if status == "failed":
            raise _step_failed(name, state)
        if status == "retrying" and not self._retry_due(name):
            raise Suspended(f"step {name!r} waits for its retry")
        limit = step_timeout(timeout, self.snapshot)
        # The attempt the run's start recorded runs even on a stopping worker: it is
        # recorded as running, and given back unrun it would cost an attempt.
        started = self._started_by_start(name, state)
        if not started:
            self._check_may_start()
        attempt = (state["attempts"] if state else 0) + (0 if started else 1)
        with step_attempt(self.run_id, self.workflow, name, attempt) as observed:
            if not started:
                await self._start_step(name, attempt, retry, status)
            observed.begin()
            try:
                value = await _attempt(name, fn, args, limit)
            except Exception as e:
                observed.end(_outcome(e))
                return await self._failed(name, attempt, e, returns)
            observed.end("completed")
            output = encode(value)
            compensable = compensate is not None
            await self._complete(step=name, attempt=attempt, output=output, compensable=compensable)
        if not isinstance(value, BaseModel):
            value = decode(output, returns)
        if compensate is not None:
            self.compensations[name] = Compensation(name, compensate, value)
        return value

    def _started_by_start(self, name: str, state: dict[str, Any] | None) -> bool:
        """Whether this is the step the run's eager start began (ADR 20): its first
        attempt is recorded and is this replay's to run. Asked once, by the first step
        the workflow runs that is not completed."""
        started, self._started = self._started, None
        if started is None:
            return False
        if name != started:
            log.warning(
                "run %s: its start began step %r but the workflow ran %r first: is it "
                "deterministic?",
                self.run_id,
                started,
                name,
            )
            return False
        return state is not None and state["status"] == "running" and state["attempts"] == 1

    async def _start_step(
        self, name: str, attempt: int, retry: RetryPolicy | None, status: str
    ) -> None:
        body: dict[str, Any] = {"step": name, "attempt": attempt, "dispatch": self._dispatch}
        if retry is not None:
            body["retry_policy"] = retry.to_json()
        try:
            await self._command("start_step", **body)
        except Refused as refused:
            if status == "running" and refused.reason == "retries_exhausted":
                # The last attempt was in flight when its worker died: it failed for good.
                error = {"type": "WorkerLost", "message": "the worker died during the attempt"}
                await self._command(
                    "fail_step", step=name, attempt=attempt - 1, error=error, retryable=False
                )
                raise StepFailedError(name, error["type"], error["message"]) from None
            raise
        await self._completions()  # a refused completion stops the run before this step

    async def _failed(self, name: str, attempt: int, exc: Exception, returns: Any) -> Any:
        retryable = not isinstance(exc, NonRetryableError)
        await self._command(
            "fail_step", step=name, attempt=attempt, error=error_of(exc), retryable=retryable
        )
        run = await self.reload()
        state = run["steps"].get(name) or {}
        if state.get("status") == "retrying":
            raise Suspended(f"step {name!r} will be retried") from exc
        if state.get("status") == "completed":  # another attempt's outcome stood
            return decode(state["output"], returns)
        raise _step_failed(name, state or {"error": error_of(exc)}) from exc

    def _retry_due(self, name: str) -> bool:
        """A retrying step runs again once due (by this clock, or the scheduler's say-so)."""
        due = {
            step: datetime.fromisoformat(state["retry_due_at"])
            for step, state in self.snapshot["steps"].items()
            if state["status"] == "retrying" and state.get("retry_due_at")
        }
        if name not in due or due[name] <= self._now() + CLOCK_SKEW:
            return True
        # Dispatched for a retry that this clock does not see due yet: the earliest one.
        return self._reason == "retry" and due[name] == min(due.values())

    # ------------------------------------------------------------------- waiting
    async def sleep(self, name: str, duration: timedelta) -> None:
        """Sleep durably: the run suspends and is dispatched again when the timer fires."""
        await self._sleep(name, {"seconds": max(duration.total_seconds(), 0.0)})

    async def sleep_until(self, name: str, when: datetime) -> None:
        if when.tzinfo is None:
            raise ValueError("sleep_until needs a time-zone-aware datetime")
        await self._sleep(name, {"until": when.isoformat()})

    async def _sleep(self, name: str, body: dict[str, Any]) -> None:
        state = self.snapshot["sleeps"].get(name)
        if state is not None:
            if state["fired"]:
                return
            raise Suspended(f"sleep {name!r} has not fired")
        self._check_may_start()
        await self._command("start_sleep", name=name, **body)
        raise Suspended(f"sleep {name!r} started")

    async def wait_for_event(
        self,
        name: str,
        event_name: str,
        match: dict[str, Any] | None = None,
        timeout: timedelta | None = None,
    ) -> dict[str, Any] | None:
        """The data of the first matching event, or None when ``timeout`` passes first."""
        state = self.snapshot["waits"].get(name)
        if state is not None:
            if state["outcome"] == "received":
                data: dict[str, Any] = state["data"]
                return data
            if state["outcome"] == "timed_out":
                return None
            raise Suspended(f"wait {name!r} is pending")
        self._check_may_start()
        body: dict[str, Any] = {"name": name, "event_name": event_name, "match": match or {}}
        if timeout is not None:
            body["timeout_seconds"] = timeout.total_seconds()
        await self._command("start_wait", **body)
        raise Suspended(f"wait {name!r} started")

    async def invoke(self, name: str, workflow: str | Callable[..., Any], input: Any = None) -> Any:
        """Run a child workflow; its output, or ChildFailedError."""
        state = self.snapshot["children"].get(name)
        if state is not None:
            if state["outcome"] == "completed":
                return state["output"]
            if state["outcome"] == "failed":
                error = state.get("error") or {}
                raise ChildFailedError(
                    name, str(error.get("type", "Error")), str(error.get("message", ""))
                )
            raise Suspended(f"child {name!r} is running")
        self._check_may_start()
        await self._command(
            "start_child", name=name, workflow=workflow_name(workflow), input=encode(input)
        )
        raise Suspended(f"child {name!r} started")

    async def send_event(self, name: str, event_name: str, data: dict[str, Any]) -> str:
        """Send an event once (named, so a replay does not send it again); its id."""
        sent = self.snapshot["sent_events"].get(name)
        if sent is not None:
            return str(sent)
        self._check_may_start()
        reply = await self._command(
            "emit_event", name=name, event_name=event_name, data=encode(data)
        )
        return str(reply["event_id"])

    # -------------------------------------------------------------------- plumbing
    async def reload(self) -> dict[str, Any]:
        reply = await self._command("load_run")
        run: dict[str, Any] = reply["run"]
        return run

    async def settled(self) -> None:
        """Returns once no step of this replay is in flight and every completion it sent
        is answered; raises the first refused completion."""
        while self._inflight:
            await self._idle.wait()
        await self._completions()

    async def _complete(self, **body: Any) -> None:
        """Send a step's completion without waiting for its reply, so the workflow goes on
        to its next step while the completion is committed (one round trip less per step).

        The request leaves before any later command. Its reply is awaited before the
        next step's function runs, before any other command, and before the run ends,
        so nothing runs after a refused completion: the refusal is raised there instead.
        A crash meanwhile is a crash before the completion was recorded: the step runs
        again on the next hand-off, as it always could.
        """
        self._completing.append(asyncio.ensure_future(self._command("complete_step", **body)))
        if body["step"] not in self.completed_steps:
            self.completed_steps.append(str(body["step"]))
        await asyncio.sleep(0)  # lets the request go out now, ahead of the next command

    def end_after_completions(self, output: Any) -> EarlyEnd | None:
        """Send ``complete_run`` now, behind the completions still unanswered, naming
        every step this replay completed (``after_steps``): the service completes the run
        only once they have completed, so the run's end costs no round trip of its own
        (ADR 16).

        None when every completion is answered, or a step's function is still running
        (a race the workflow did not wait for): the worker then waits (:meth:`settled`)
        and sends ``complete_run`` itself. A ``steps_pending`` refusal means a completion
        was not applied first (another command-service instance took it, or it changed
        nothing): the worker sends the same end again once the completions are answered.
        """
        if self._inflight or all(f.done() for f in self._completing):
            return None
        # Every step this replay completed: one whose completion was refused, or changed
        # nothing (another worker's attempt had failed it meanwhile), is not completed,
        # so the run is refused too.
        body = self.end_body(output)
        return EarlyEnd(body, asyncio.ensure_future(self._send("complete_run", body)))

    def end_body(self, output: Any) -> dict[str, Any]:
        """``complete_run``'s body, guarded by every step this replay completed."""
        body = {"run_id": self.run_id, "output": output}
        if self.completed_steps:
            body["after_steps"] = list(self.completed_steps)
        return body

    async def _completions(self) -> None:
        """Wait for the replies of the completions sent so far; raise the first refusal."""
        sent = list(self._completing)
        if not sent:
            return
        # asyncio.wait neither raises nor cancels the completions if this caller is
        # cancelled; every outcome is read, so none is left unretrieved.
        if waiting := [reply for reply in sent if not reply.done()]:
            await asyncio.wait(waiting)
        self._completing = [f for f in self._completing if not f.done()]
        failures: list[BaseException] = []
        for reply in sent:
            failure = asyncio.CancelledError() if reply.cancelled() else reply.exception()
            if failure is not None:
                failures.append(failure)
        if failures:
            # An Interrupt first (a refusal, or no answer: HandedBack, see _command): it
            # says what the worker must do next. A permanent failure (an output too large)
            # is raised as itself, as before ADR 15.
            raise next((e for e in failures if isinstance(e, Interrupt)), failures[0])

    def _check_may_start(self) -> None:
        if self._replay_only:
            raise Suspended("replaying only: nothing new is recorded")
        if self._stopping():
            raise HandedBack("the worker is stopping")

    async def _command(self, command: str, /, **body: Any) -> dict[str, Any]:
        if command not in ("complete_step", "start_step"):
            await self._completions()  # every other command follows the completions
        try:
            return await self._send(command, {"run_id": self.run_id, **body})
        except InvalidStateError as e:
            if is_superseded(e):
                raise Superseded(str(e)) from None
            raise Refused(str(e), e.reason) from None
        except Exception as e:
            if _transient(e):
                # No answer says nothing of the run: the workflow's own code must not
                # catch it (and fail the run for a brief outage); the task goes back,
                # and the replay finds the command applied or sends it again.
                raise HandedBack(f"{command} got no answer: {e}") from e
            raise


class _Reached(Interrupt):
    """The probe reached an operation of the workflow: it goes no further."""


async def _nothing_sent(name: str, body: dict[str, Any]) -> dict[str, Any]:
    raise _Reached("nothing is sent")


class _Probe(RunContext):
    """A new run's replay that records nothing and stops at its first operation."""

    reached = False
    found: dict[str, Any] | None = None
    """The first operation, when it is a step that ``start_run`` can begin."""

    def _reach(self, found: dict[str, Any] | None = None) -> _Reached:
        if not self.reached:  # the first one only (a ``finally`` may try others)
            self.reached, self.found = True, found
        return _Reached("the workflow's first operation")

    async def _step(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        retry: RetryPolicy | None,
        compensate: Callable[[Any], Any] | None,
        timeout: timedelta | None = None,
    ) -> Any:
        try:
            check_step_name("step", name)
            step_timeout(timeout, self.snapshot)
        except (InvalidCommandError, ValueError):
            raise self._reach() from None  # refused where it always was, by the replay
        found: dict[str, Any] = {"step": name}
        if retry is not None:
            found["retry_policy"] = retry.to_json()
        raise self._reach(found)

    async def _command(self, command: str, /, **body: Any) -> dict[str, Any]:
        raise self._reach()


def first_step(
    call: Callable[[RunContext], Coroutine[Any, Any, Any]], snapshot: dict[str, Any]
) -> dict[str, Any] | None:
    """The step a new run's workflow begins with (``start_run``'s ``first_step``, ADR 20),
    found by running ``call`` (the workflow function) up to its first operation, with
    nothing recorded. ``snapshot`` is the new run's (its ``run_id`` may be provisional:
    see ``Worker.first_step``). Needs a running event loop.

    None when the workflow begins with anything else (a sleep, a wait, a child...), ends
    or fails first, or awaits anything but the context first: the probe runs its code
    only as far as it goes without the event loop, in a copy of the caller's context
    variables. Tasks the workflow created meanwhile are cancelled before they ever run.
    """
    probe = _Probe(snapshot, _nothing_sent)
    loop = asyncio.get_running_loop()
    factory = loop.get_task_factory()
    made: list[asyncio.Task[Any]] = []

    def making(loop: asyncio.AbstractEventLoop, coro: Any, **options: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **options)  # never an eager factory's: not run
        made.append(task)
        return task

    variables = contextvars.copy_context()  # what the workflow sets stays in the probe
    loop.set_task_factory(making)  # nothing else runs until it is put back
    try:
        coro = call(probe)
        try:
            awaited = variables.run(coro.send, None)
        except (Exception, Interrupt, asyncio.CancelledError):
            pass  # it reached an operation (or ended or failed before any)
        else:
            probe.reached = True  # what its cleanup does on close is not its first step
            if isinstance(awaited, asyncio.Future):  # left behind: none reads its end
                awaited.add_done_callback(_read_outcome)
            with contextlib.suppress(Exception, Interrupt, asyncio.CancelledError):
                variables.run(coro.close)  # it awaited something else: the replay does it
    finally:
        loop.set_task_factory(factory)
        for task in made:
            task.cancel()
    return probe.found


def _read_outcome(future: asyncio.Future[Any]) -> None:
    """Reads a future's outcome, so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


def _transient(error: BaseException) -> bool:
    """An error that says nothing of the command, only that its answer did not come."""
    if isinstance(error, CommandError):
        return error.code in ("unavailable", "timeout")
    return isinstance(error, OSError | TimeoutError)


def _step_failed(name: str, state: dict[str, Any]) -> StepFailedError:
    error = state.get("error") or {}
    return StepFailedError(name, str(error.get("type", "Error")), str(error.get("message", "")))
