"""The SDK's only contact with NATS: command requests and the worker task queues."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from infrastructure import codec
from infrastructure.nats.names import HEADER_ORIGINATOR_ID, HEADER_TRACEPARENT, Names
from infrastructure.nats.requests import request
from infrastructure.nats.streams import StreamLimits, ensure_stream_exists, tasks_config
from ledgerflow import _ports as ports
from ledgerflow._telemetry import outgoing_headers
from ledgerflow.errors import CommandError, checked

if TYPE_CHECKING:
    from infrastructure.nats.command_service import CommandService
    from infrastructure.settings import Settings
    from services.workflow_runs import WorkflowRuns

log = logging.getLogger("ledgerflow.transport")

COMMAND_TIMEOUT = 10.0
"""Seconds a command request waits for its reply."""


def request_payload(body: dict[str, Any]) -> bytes:
    """A command's request body, as sent over NATS and to a direct service alike (unset
    fields left out; the standard library's JSON, so NaN reaches the service and is
    refused there)."""
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


class Transport:
    """A NATS connection that sends commands to ``<prefix>.cmd.<name>``."""

    def __init__(self, nc: NatsClient, subject_prefix: str, timeout: float = COMMAND_TIMEOUT):
        self.nc = nc
        self.names = Names(subject_prefix)
        self.timeout = timeout
        self._ends = _RunEnds(nc, self.names)

    @classmethod
    async def connect(cls, nats_url: str, subject_prefix: str, name: str) -> Transport:
        nc = await nats.connect(nats_url, name=name, connect_timeout=2)
        return cls(nc, subject_prefix)

    async def command(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send one command; the reply body, or the refusal raised as an exception."""
        payload = request_payload(body)
        try:
            msg = await request(
                self.nc, self.names.command(name), payload, self.timeout, headers=outgoing_headers()
            )
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as e:
            raise CommandError("unavailable", f"{name}: no reply from the command service") from e
        return checked(json.loads(msg.data))

    def run_ends(self, run_id: str) -> contextlib.AbstractAsyncContextManager[RunEnd]:
        """An event set when the relay publishes the end of run ``run_id``.

        The relay's JetStream publishes reach plain subscribers too, so a waiting client
        hears of the end within a message's latency instead of a polling interval.
        """
        return self._ends.waiting(run_id)

    @contextlib.asynccontextmanager
    async def hold(self, run_id: str) -> AsyncIterator[None]:
        """Answer ``<prefix>.held.<run_id>`` while entered (ADR 17): a request there gets
        a reply while this process holds the run, and no responders once it is gone."""

        async def answer(msg: Msg) -> None:
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(b"held")

        subscription = await self.nc.subscribe(self.names.held(run_id), cb=answer)
        try:
            yield
        finally:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()

    async def open_queue(self, queue: str, ack_wait: float) -> TaskQueue:
        return await TaskQueue.open(self, queue, ack_wait)

    async def close(self) -> None:
        self._ends.close()
        if not self.nc.is_closed:
            await self.nc.drain()


class DirectTransport(Transport):
    """Commands applied in this process to the event store (ADR 19), NATS for the rest.

    The commands go through a :class:`CommandService` of this process's own: the same
    validation, group commit and replies as the ``commands`` role's, without the hop to
    it. Every direct transport of one event loop on the same settings shares that
    service, so a client and the worker beside it commit together and share its cache.
    Run ends, task queues and holds stay on NATS.
    """

    def __init__(
        self,
        nc: NatsClient,
        subject_prefix: str,
        service: _SharedService,
        timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        super().__init__(nc, subject_prefix, timeout)
        self._shared = service
        self._closed = False

    @classmethod
    async def open(
        cls, settings: Settings, name: str, app: WorkflowRuns | None = None
    ) -> DirectTransport:
        """``app``: the service to apply commands with, if this opens the shared one (a
        test's, on its clock); it stays the caller's to close. By default one of its own."""
        shared = await _SharedService.take(settings, app)
        try:
            nc = await nats.connect(settings.nats_url, name=name, connect_timeout=2)
        except BaseException:
            await shared.give_back()
            raise
        return cls(nc, settings.subject_prefix, shared)

    async def command(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = self._shared.service.submit(name, request_payload(body), outgoing_headers())
        try:
            reply = await asyncio.wait_for(answer, self.timeout)
        except TimeoutError as e:
            raise CommandError("unavailable", f"{name}: the event store did not answer") from e
        # As a reply over NATS would carry it: plain JSON values, nothing shared.
        return checked(codec.loads(codec.dumps(reply)))

    async def close(self) -> None:
        if self._closed:  # the shared service is given back once
            return
        self._closed = True
        try:
            await self._shared.give_back()
        finally:
            await super().close()


@dataclass
class _SharedService:
    """One in-process command service per event loop and settings, with its users."""

    key: tuple[asyncio.AbstractEventLoop, Settings]
    service: CommandService
    owned: bool
    """Whether the service's WorkflowRuns is closed with it."""
    users: int = 0

    _open: ClassVar[dict[tuple[asyncio.AbstractEventLoop, Settings], _SharedService]] = {}

    @classmethod
    async def take(cls, settings: Settings, app: WorkflowRuns | None = None) -> _SharedService:
        key, given = (asyncio.get_running_loop(), settings), app
        for stale in [k for k in cls._open if k[0].is_closed()]:
            left = cls._open.pop(stale)  # its loop ended without closing its users
            if left.owned:
                left.service.app.close()
        shared = cls._open.get(key)
        if shared is None:
            from infrastructure.bootstrap import bootstrap
            from infrastructure.nats.command_service import CommandService

            owned = app is None
            if app is None:
                app = await asyncio.to_thread(bootstrap, settings)
            shared = cls._open.get(key)  # another user opened it meanwhile
            if shared is None:
                service = CommandService.configured(app, settings)
                await service.start(None)
                shared = cls._open[key] = cls(key, service, owned)
            elif owned:
                app.close()
        if given is not None and shared.service.app is not given:
            raise ValueError("a direct command service is open already with another store")
        shared.users += 1
        return shared

    async def give_back(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        if self._open.get(self.key) is self:
            del self._open[self.key]
        try:
            await self.service.stop()  # answers every command it took
        finally:
            if self.owned:
                await asyncio.to_thread(self.service.app.close)


async def connect(settings: Settings, name: str) -> Transport:
    """The transport ``settings`` ask for: direct commands, or commands over NATS."""
    if settings.direct_commands:
        return await DirectTransport.open(settings, name)
    return await Transport.connect(settings.nats_url, settings.subject_prefix, name)


RUN_ENDS = ("RunCompleted", "RunFailed", "RunCancelled", "RunTimedOut")
LINGER = 30.0
"""Seconds the run-end subscriptions outlive their last waiter (a client that waits for
one result usually waits for the next: resubscribing each time would cost more)."""


class RunEnd(asyncio.Event):
    """Set when the run ends; ``output`` holds a completed run's output as published."""

    def __init__(self) -> None:
        super().__init__()
        self.completed = False
        self.output: Any = None


class _RunEnds:
    """One subscription to the run-end subjects per connection, whatever the number of
    waiters: each end is parsed once and handed to the waiters of its run only."""

    def __init__(self, nc: NatsClient, names: Names) -> None:
        self._nc = nc
        self._names = names
        self._waiters: dict[str, set[RunEnd]] = {}
        self._subscriptions: list[Any] = []
        self._subscribing = asyncio.Lock()
        self._linger: asyncio.TimerHandle | None = None
        self._leaving: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def waiting(self, run_id: str) -> AsyncIterator[RunEnd]:
        ended = RunEnd()
        self._waiters.setdefault(run_id, set()).add(ended)
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        try:
            await self._subscribed()
            yield ended
        finally:
            waiters = self._waiters.get(run_id)
            if waiters is not None:
                waiters.discard(ended)
                if not waiters:
                    del self._waiters[run_id]
            if not self._waiters and self._subscriptions and self._linger is None:
                loop = asyncio.get_running_loop()
                self._linger = loop.call_later(LINGER, self._unsubscribe_if_idle)

    async def _subscribed(self) -> None:
        """Subscribed, and the server knows it, before the caller looks at the run."""
        async with self._subscribing:
            if self._subscriptions:
                return
            subscriptions = [
                await self._nc.subscribe(
                    self._names.event_subject("WorkflowRun", kind), cb=self._heard
                )
                for kind in RUN_ENDS
            ]
            await self._nc.flush()
            self._subscriptions = subscriptions

    async def _heard(self, msg: Msg) -> None:
        waiters = self._waiters.get((msg.headers or {}).get(HEADER_ORIGINATOR_ID, ""))
        if not waiters:
            return
        completed, output = False, None
        if msg.subject.endswith(".RunCompleted"):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                output = json.loads(msg.data)["data"]["output"]
                completed = True
        for ended in waiters:
            ended.completed, ended.output = completed, output
            ended.set()

    def _unsubscribe_if_idle(self) -> None:
        self._linger = None
        if not self._waiters and self._leaving is None:
            self._leaving = asyncio.get_running_loop().create_task(self._unsubscribe())

    async def _unsubscribe(self) -> None:
        try:
            async with self._subscribing:
                if self._waiters:
                    return  # a waiter came back meanwhile
                subscriptions, self._subscriptions = self._subscriptions, []
                for subscription in subscriptions:
                    with contextlib.suppress(Exception):
                        await subscription.unsubscribe()
        finally:
            self._leaving = None

    def close(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None


@dataclass
class Task:
    """A task message: which run to move, under which hand-off (``dispatch``)."""

    run_id: str
    dispatch: int
    reason: str
    queue: str
    position: int
    msg: Msg
    traceparent: str | None = None
    """The relay's trace context: the worker's spans continue the run's trace from it."""
    deliveries: int = 1

    @classmethod
    def of(cls, msg: Msg) -> Task:
        body = json.loads(msg.data)
        try:
            deliveries = msg.metadata.num_delivered or 1
        except Exception:  # not a JetStream message, or an ack subject it cannot read
            deliveries = 1
        return cls(
            str(body["run_id"]),
            int(body["dispatch"]),
            str(body["reason"]),
            str(body["queue"]),
            int(body["position"]),
            msg,
            (msg.headers or {}).get(HEADER_TRACEPARENT),
            deliveries,
        )

    async def ack(self) -> None:
        await self.msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        await self.msg.nak(delay=delay)

    async def in_progress(self) -> None:
        await self.msg.in_progress()


class TaskQueue:
    """The durable pull consumer of one queue, shared by every worker of that queue."""

    def __init__(self, sub: Any, queue: str) -> None:
        self._sub = sub
        self.queue = queue

    @classmethod
    async def open(cls, transport: Transport, queue: str, ack_wait: float) -> TaskQueue:
        names = transport.names
        js = transport.nc.jetstream()
        await ensure_stream_exists(js, tasks_config(names, StreamLimits()))  # the relay's to size
        durable = names.consumer(f"worker-{queue}")
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_ack_pending=10_000,
            filter_subject=names.task(queue),
        )
        sub = await js.pull_subscribe(
            names.task(queue), durable=durable, stream=names.tasks_stream, config=config
        )
        return cls(sub, queue)

    async def fetch(self, count: int, timeout: float) -> list[ports.Task]:
        """Up to ``count`` tasks; none when ``timeout`` passes first."""
        try:
            msgs = await self._sub.fetch(count, timeout=timeout)
        except (nats.errors.TimeoutError, TimeoutError):
            return []
        tasks: list[ports.Task] = []
        for msg in msgs:
            try:
                tasks.append(Task.of(msg))
            except (ValueError, KeyError, TypeError):
                log.error("dropping a malformed task message: %r", msg.data[:200])
                await msg.term()
        return tasks

    async def close(self) -> None:
        with contextlib.suppress(
            nats.errors.BadSubscriptionError, nats.errors.ConnectionClosedError
        ):
            await self._sub.unsubscribe()
