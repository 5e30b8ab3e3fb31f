"""The command service: NATS request/reply on ``<prefix>.cmd.<name>``, group-committed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import nats
import nats.errors
from eventsourcing.persistence import OperationalError as StoreOperationalError
from nats.aio.client import Client
from nats.aio.msg import Msg
from psycopg import OperationalError as PgOperationalError
from pydantic import ValidationError

from domain.errors import DomainError
from domain.values import JSON
from infrastructure import codec, metrics
from infrastructure.bootstrap import bootstrap
from infrastructure.nats.names import Names
from infrastructure.settings import Settings
from infrastructure.telemetry.stamping import stamping
from infrastructure.telemetry.tracing import CommandTrace, begin_command
from ledgerflow._telemetry import TRACING, log_context
from services import commands as c
from services.workflow_runs import COMMANDS, Result, WorkflowRuns

log = logging.getLogger("ledgerflow.commands")

QUEUE_GROUP = "ledgerflow-commands"

EAGER_MAX_REQUEST_BYTES = 256 * 1024
"""A larger start is not made eager: its reply repeats the input in the run's snapshot,
and must stay within NATS's payload limit (1 MiB by default) like any message."""

STORE_DOWN_SECONDS = 1.0
"""After the store fails, commands answer ``unavailable`` at once for this long."""


class CommandError(Exception):
    """A request refused before it reached the domain (parsing, size, name)."""

    def __init__(self, code: str, message: str, details: list[JSON] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details or []


def error_body(code: str, message: str, details: Sequence[JSON] = ()) -> dict[str, JSON]:
    return {"ok": False, "error": {"code": code, "message": message, "details": list(details)}}


def parse_command(name: str, payload: bytes, max_bytes: int) -> c.Command:
    """Validate one request body against the named command; CommandError when it can't be."""
    if len(payload) > max_bytes:
        raise CommandError(
            "too_large", f"request is {len(payload)} bytes; the limit is {max_bytes}"
        )
    command_type = COMMANDS.get(name)
    if command_type is None:
        raise CommandError(
            "invalid_command", f"unknown command {name!r}", [{"known": sorted(COMMANDS)}]
        )
    try:
        body = codec.loads(payload or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CommandError("invalid_command", f"request is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise CommandError("invalid_command", "request must be a JSON object")
    try:
        return command_type.model_validate(body)
    except ValidationError as e:
        details: list[JSON] = [
            {"loc": [str(p) for p in err["loc"]], "msg": err["msg"], "type": err["type"]}
            for err in e.errors()
        ]
        raise CommandError("invalid_command", f"invalid {name} request", details) from None


def reply_body(result: Result) -> dict[str, JSON]:
    if isinstance(result, DomainError):
        return error_body(result.code, result.message, result.details)
    return result.to_json()


@dataclass
class _Pending:
    name: str
    command: c.Command
    answer: Msg | asyncio.Future[dict[str, JSON]]
    """The request to respond to, or the future of a command submitted in process."""
    arrived: float
    trace: CommandTrace | None = None


INLINE_BATCH = 2
"""A batch of at most this many commands is applied on the event loop, not in a thread:
the thread hop cost more than the commit it waits for (docs/performance.md, rows 22 and
24). Small batches are what a quiet service makes; under load they grow and go to the
thread. After a store failure every batch goes to the thread until one succeeds there."""


class CommandService:
    """Answers command requests; applies whatever has queued up as one batch (group commit).

    While one batch is in the database, the next requests queue up and become the next
    batch: under load batches grow to ``max_batch``, and an idle service adds no delay.
    Requests come over NATS (:meth:`start` with a connection) or from this process
    (:meth:`submit`: direct commands, ADR 19), through the same parsing and batches.
    """

    def __init__(
        self,
        app: WorkflowRuns,
        names: Names,
        *,
        max_bytes: int = 1024 * 1024,
        max_batch: int = 200,
        inline_batch: int = INLINE_BATCH,
    ) -> None:
        """``inline_batch``: a batch of at most this many commands is applied on the event
        loop, not in a thread (:data:`INLINE_BATCH`)."""
        self.app = app
        self.names = names
        self.max_bytes = max_bytes
        self.max_batch = max_batch
        self.inline_batch = inline_batch
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._eager_max_bytes = EAGER_MAX_REQUEST_BYTES
        self._store_down_until = 0.0
        self._inline_ok = True
        """False from a store failure until a batch in a thread succeeds: a batch on the
        event loop would hold it for the store's retries (seconds) while it is down."""
        self._stopped = False
        self._worker: asyncio.Task[None] | None = None
        self._subscription: Any = None

    @classmethod
    def configured(
        cls, app: WorkflowRuns, settings: Settings, *, inline_batch: int = INLINE_BATCH
    ) -> CommandService:
        """A service with ``settings``' subjects, size limit and batch size."""
        return cls(
            app,
            Names(settings.subject_prefix),
            max_bytes=settings.max_command_bytes,
            max_batch=settings.max_command_batch,
            inline_batch=inline_batch,
        )

    async def start(self, nc: Client | None) -> None:
        """Apply batches; with ``nc``, answer the requests on the commands' subjects too
        (without, only :meth:`submit` brings commands)."""
        self._worker = asyncio.create_task(self._apply_batches(), name="command-batches")
        if nc is None:
            return
        # An eager start's reply repeats its input, with room for the rest of the run.
        self._eager_max_bytes = min(EAGER_MAX_REQUEST_BYTES, nc.max_payload - 16 * 1024)
        self._subscription = await nc.subscribe(
            self.names.commands_wildcard, queue=QUEUE_GROUP, cb=self._on_request
        )
        await nc.flush()  # the server knows the subscription before start() returns
        log.info(
            "answering commands on %s (queue group %s)", self.names.commands_wildcard, QUEUE_GROUP
        )

    async def stop(self) -> None:
        """Stop taking requests, answer every one already taken, then return."""
        self._stopped = True
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None
        try:
            await self._queue.join()
        finally:
            if self._worker is not None:
                self._worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._worker

    async def _on_request(self, msg: Msg) -> None:
        name = msg.subject.rsplit(".", 1)[-1]
        refusal = self._take(name, msg.data, msg, msg.headers, self._eager_max_bytes)
        if refusal is not None:
            await _respond(msg, refusal)

    def submit(
        self, name: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[dict[str, JSON]]:
        """Queue one command sent from this process (ADR 19); the future of its reply body.

        ``payload`` is the request body as the SDK encodes it for NATS; it is checked as a
        request's is (the same size limit and validation) and joins the same batches. It
        is queued before this returns, so commands sent one after the other without
        waiting share a batch as they would over NATS. Its reply is not sent over NATS, so
        an eager start of any size stays eager.
        """
        answer: asyncio.Future[dict[str, JSON]] = asyncio.get_running_loop().create_future()
        if self._stopped:
            answer.set_result(error_body("unavailable", "the command service has stopped"))
            return answer
        refusal = self._take(name, payload, answer, headers, self.max_bytes)
        if refusal is not None:
            answer.set_result(refusal)
        return answer

    def _take(
        self,
        name: str,
        payload: bytes,
        answer: Msg | asyncio.Future[dict[str, JSON]],
        headers: dict[str, str] | None,
        eager_max_bytes: int,
    ) -> dict[str, JSON] | None:
        """Queue a request for the next batch; the refusal to answer at once instead."""
        arrived = time.perf_counter()
        try:
            command = parse_command(name, payload, self.max_bytes)
        except CommandError as e:
            metrics.COMMANDS.labels(
                name=name if name in COMMANDS else "unknown", outcome=e.code
            ).inc()
            return error_body(e.code, e.message, e.details)
        eager = isinstance(command, c.StartRun) and command.eager
        if eager and len(payload) > eager_max_bytes:
            command = command.model_copy(update={"eager": False})
        traced = begin_command(name, command, headers) if TRACING.enabled else None
        self._queue.put_nowait(_Pending(name, command, answer, arrived, traced))
        return None

    async def _apply_batches(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # One turn of the loop lets the commands sent in the same turn join (a step's
            # completion and what the workflow sends right after it): no wait added.
            await asyncio.sleep(0)
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await self._execute(batch)
                for pending, body in zip(batch, results, strict=True):
                    with log_context(_run_of(pending, body), _position_of(body)):
                        self._observe(pending, body)
                        await _respond(pending.answer, body)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _execute(self, batch: list[_Pending]) -> list[dict[str, JSON]]:
        unavailable = error_body("unavailable", "the event store is unavailable; retry")
        if time.monotonic() < self._store_down_until:
            return [unavailable] * len(batch)  # fail fast: don't queue behind a dead store
        metrics.COMMAND_BATCH_SIZE.observe(len(batch))
        appended = self.app.events_appended
        stamps = _stamps(batch) if TRACING.enabled else {}
        try:
            with stamping(stamps):  # asyncio.to_thread runs in a copy of this context
                commands = [p.command for p in batch]
                if len(batch) <= self.inline_batch and self._inline_ok:
                    results = self.app.execute(commands)  # holds the loop for one commit
                else:
                    results = await asyncio.to_thread(self.app.execute, commands)
                    self._inline_ok = True
        except (StoreOperationalError, PgOperationalError) as e:
            log.warning("event store unavailable: %s", e)
            self._store_down_until = time.monotonic() + STORE_DOWN_SECONDS
            self._inline_ok = False
            return [unavailable] * len(batch)
        except Exception:
            log.exception("batch of %d commands failed", len(batch))
            return [error_body("internal", "internal error; nothing was applied")] * len(batch)
        metrics.EVENTS_APPENDED.inc(self.app.events_appended - appended)
        return [reply_body(result) for result in results]

    @staticmethod
    def _observe(pending: _Pending, body: dict[str, JSON]) -> None:
        error = body.get("error")
        outcome = "ok" if body.get("ok") else str(error["code"] if isinstance(error, dict) else "")
        metrics.COMMANDS.labels(name=pending.name, outcome=outcome).inc()
        metrics.COMMAND_SECONDS.labels(name=pending.name).observe(
            time.perf_counter() - pending.arrived
        )
        if pending.trace is not None:
            pending.trace.end(body)
        log.debug("%s: %s", pending.name, outcome)


def _stamps(batch: list[_Pending]) -> dict[UUID, str]:
    """The events a traced command appends keep its span as their parent (the first
    command of the batch on an aggregate, in the rare case of two)."""
    return {
        p.trace.target: traceparent
        for p in reversed(batch)
        if p.trace is not None
        and p.trace.target is not None
        and (traceparent := p.trace.traceparent) is not None
    }


def _run_of(pending: _Pending, body: dict[str, JSON]) -> object:
    """The run (or inbound event) a command concerns, for its log lines."""
    return getattr(pending.command, "run_id", None) or body.get("run_id") or body.get("event_id")


def _position_of(body: dict[str, JSON]) -> int | None:
    position = body.get("position")
    return position if isinstance(position, int) else None


async def _respond(msg: Msg | asyncio.Future[dict[str, JSON]], body: dict[str, JSON]) -> None:
    if isinstance(msg, asyncio.Future):
        if not msg.done():  # unless its sender stopped waiting
            msg.set_result(body)
        return
    if not msg.reply:  # a plain publish wants no answer
        return
    try:
        await msg.respond(codec.dumps(body))
    except nats.errors.Error as e:  # too large, or the connection is down: this reply only
        log.warning("could not answer a request on %s: %s", msg.subject, e)


async def connect_nats(settings: Settings, name: str) -> Client:
    try:
        return await nats.connect(
            settings.nats_url, name=name, connect_timeout=5, max_reconnect_attempts=-1
        )
    except Exception as e:
        raise ConnectionError(
            f"cannot reach NATS at {settings.nats_url}: {e} (start it with `make up`)"
        ) from e


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """The ``commands`` role: serve until ``stop`` is set, then answer what is in hand."""
    app = await asyncio.to_thread(bootstrap, settings)
    nc = await connect_nats(settings, "ledgerflow-commands")
    service = CommandService.configured(app, settings)
    try:
        await service.start(nc)
        await stop.wait()
        log.info("stopping: answering the commands in hand")
        await service.stop()
    finally:
        await nc.drain()
        app.close()
