"""Client: start runs, send events, cancel, retry and await results over NATS commands."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from domain.errors import InvalidCommandError
from infrastructure.settings import Settings
from ledgerflow import _transport
from ledgerflow._ports import Transport
from ledgerflow.context import encode
from ledgerflow.errors import RunFailedError
from ledgerflow.flow import workflow_name

if TYPE_CHECKING:
    from ledgerflow.worker import EagerRun, Worker

ENDED = frozenset({"completed", "failed", "cancelled"})
RECHECK = 1.0
"""Seconds between looks at a run whose end was not heard (a relay behind, or restarting)."""
KEPT_OUTPUTS = 1024
"""Outputs of eager runs kept for :meth:`Client.result` after they completed unasked."""


class Client:
    """Talks to the command service: ``await Client.connect(...)``, then ``close()``.

    With ``worker`` (a running :class:`~ledgerflow.Worker` in this process), a run of a
    workflow that worker serves is started eagerly when it has a free slot (ADR 17): the
    start's reply hands the run to that worker at once, and :meth:`result` has the
    output as soon as the worker completes it. Any other run goes through the queue.
    """

    def __init__(self, transport: Transport, *, worker: Worker | None = None) -> None:
        self._transport = transport
        self._worker = worker
        self._eager: dict[str, asyncio.Task[EagerRun]] = {}
        self._first_steps = True  # until a service refuses them (older than ADR 20)
        self._outputs: OrderedDict[str, Any] = OrderedDict()

    @classmethod
    async def connect(
        cls,
        nats_url: str = "nats://127.0.0.1:4222",
        subject_prefix: str = "ledgerflow",
        *,
        settings: Settings | None = None,
        worker: Worker | None = None,
    ) -> Client:
        name = f"ledgerflow-client-{uuid.uuid4().hex[:8]}"
        if settings is not None:  # direct commands (ADR 19) if they ask for them
            return cls(await _transport.connect(settings, name), worker=worker)
        transport = await _transport.Transport.connect(nats_url, subject_prefix, name)
        return cls(transport, worker=worker)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(
        self, workflow: str | Callable[..., Any], input: Any = None, key: str | None = None
    ) -> str:
        """Start a run (at most one per ``key``); its id."""
        name = workflow_name(workflow)
        body = {"workflow": name, "input": encode(input), "key": key}
        worker = self._worker
        if worker is None or not worker.reserve_eager(name):
            return str((await self.command("start_run", body))["run_id"])
        started: dict[str, Any] | None = None
        try:
            eager: dict[str, Any] = {**body, "eager": True}
            if self._first_steps:
                started = worker.first_step(name, body["input"], key)
            if started is None:
                reply = await self.command("start_run", eager)
            else:  # recorded with the run: one write less (ADR 20)
                try:
                    reply = await self.command("start_run", {**eager, "first_step": started})
                except InvalidCommandError:
                    started = None  # a service older than ADR 20? Eager without it:
                    reply = await self.command("start_run", eager)
                    self._first_steps = False  # it was, as this start took
        except InvalidCommandError:
            # A command service older than ADR 17 knows no eager start (or the start is
            # invalid anyway, and is refused again as such).
            worker.release_eager()
            return str((await self.command("start_run", body))["run_id"])
        except BaseException:
            worker.release_eager()
            raise
        run_id, run = str(reply["run_id"]), reply.get("run")
        if run is None:  # a keyed run that exists already, or a limited workflow
            worker.release_eager()
        else:
            step = None if started is None else str(started["step"])
            held = worker.run_eager(run, int(reply["position"]), step)
            self._eager[run_id] = held
            held.add_done_callback(lambda done: self._kept(run_id, done))
        return run_id

    def _kept(self, run_id: str, done: asyncio.Task[EagerRun]) -> None:
        """An eager run let go: keep its output (if it completed) for :meth:`result`."""
        if self._eager.get(run_id) is done:
            del self._eager[run_id]
        if not _completed(done):
            return
        self._outputs[run_id] = done.result().output
        while len(self._outputs) > KEPT_OUTPUTS:
            self._outputs.popitem(last=False)

    async def send_event(
        self, name: str, data: dict[str, Any] | None = None, id: str | None = None
    ) -> str:
        """Send an inbound event (once per ``id``); its event id."""
        body = {"name": name, "data": encode(data or {}), "id": id}
        reply = await self.command("send_event", body)
        return str(reply["event_id"])

    async def cancel(self, run_id: str, reason: str | None = None) -> None:
        await self.command("cancel_run", {"run_id": run_id, "reason": reason})

    async def retry(self, run_id: str) -> None:
        """Resume a failed run from its failed step."""
        await self.command("retry_run", {"run_id": run_id})

    async def get(self, run_id: str) -> dict[str, Any]:
        """The run's current state (the ``load_run`` snapshot)."""
        reply = await self.command("load_run", {"run_id": run_id})
        run: dict[str, Any] = reply["run"]
        return run

    async def result(self, run_id: str, timeout: float = 60.0) -> Any:
        """Wait for the run to end: its output, or RunFailedError (TimeoutError at the end).

        It listens for the run's end on the events stream and looks at the run whenever it
        hears of it, and at least every RECHECK seconds in case the relay is behind.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if run_id in self._outputs:
            return self._outputs[run_id]
        async with self._transport.run_ends(run_id) as ended:
            if run_id in self._outputs:  # its eager run completed while this subscribed
                return self._outputs[run_id]
            eager = self._eager.get(run_id)
            if eager is not None:  # this process's worker holds it: its end is heard here
                heard = asyncio.ensure_future(ended.wait())  # unless another holder's is
                try:
                    await asyncio.wait(
                        {eager, heard}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    heard.cancel()
                if _completed(eager):
                    return eager.result().output
            while True:
                if getattr(ended, "completed", False):
                    # The published RunCompleted carries the output: a completed run never
                    # changes again, so there is nothing more to ask the service.
                    return getattr(ended, "output", None)
                run = await self.get(run_id)
                if run["status"] == "completed":
                    return run["output"]
                if run["status"] in ENDED:
                    raise RunFailedError(run_id, run["status"], run.get("error"))
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError(f"run {run_id} is still {run['status']} after {timeout:g} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), min(left, RECHECK))

    async def command(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send any command by its wire name; its reply (refusals raise)."""
        return await self._transport.command(name, body)

    async def close(self) -> None:
        await self._transport.close()


def _completed(eager: asyncio.Task[EagerRun]) -> bool:
    """Whether an eager run's worker completed it (its output is then the task's)."""
    return (
        eager.done()
        and not eager.cancelled()
        and eager.exception() is None
        and eager.result().completed
    )
