"""Client: start runs, send events, cancel, retry and await results over NATS commands."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from infrastructure.settings import Settings
from ledgerflow import _transport
from ledgerflow._ports import Transport
from ledgerflow.context import encode
from ledgerflow.errors import RunFailedError
from ledgerflow.flow import workflow_name

ENDED = frozenset({"completed", "failed", "cancelled"})
RECHECK = 1.0
"""Seconds between looks at a run whose end was not heard (a relay behind, or restarting)."""


class Client:
    """Talks to the command service: ``await Client.connect(...)``, then ``close()``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    @classmethod
    async def connect(
        cls,
        nats_url: str = "nats://127.0.0.1:4222",
        subject_prefix: str = "ledgerflow",
        *,
        settings: Settings | None = None,
    ) -> Client:
        if settings is not None:
            nats_url, subject_prefix = settings.nats_url, settings.subject_prefix
        name = f"ledgerflow-client-{uuid.uuid4().hex[:8]}"
        return cls(await _transport.Transport.connect(nats_url, subject_prefix, name))

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
        reply = await self.command(
            "start_run", {"workflow": workflow_name(workflow), "input": encode(input), "key": key}
        )
        return str(reply["run_id"])

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
        async with self._transport.run_ends(run_id) as ended:
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
