"""What the SDK needs from a transport: commands, run ends, and task queues.

Two transports satisfy it: NATS (``_transport.py``, for ``ledgerflow serve``) and the
embedded engine's in-process delivery (``infrastructure/embedded``, for ``ledgerflow dev``).
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol


class Task(Protocol):
    """One hand-off of a run to a worker: which run, under which ``dispatch`` (fence)."""

    run_id: str
    dispatch: int
    reason: str
    queue: str
    position: int
    traceparent: str | None
    """The W3C trace context to continue the run's trace from (None: the run's root)."""
    deliveries: int
    """How many times this task has been delivered, this time included (1: the first)."""

    async def ack(self) -> None: ...

    async def nak(self, delay: float | None = None) -> None: ...

    async def in_progress(self) -> None: ...


class TaskQueue(Protocol):
    queue: str

    async def fetch(self, count: int, timeout: float) -> list[Task]:
        """Up to ``count`` tasks; none when ``timeout`` passes first."""
        ...

    async def close(self) -> None: ...


class Transport(Protocol):
    async def command(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send one command; the reply body, or the refusal raised as a CommandError."""
        ...

    def run_ends(self, run_id: str) -> AbstractAsyncContextManager[asyncio.Event]:
        """An event set when run ``run_id`` is heard to end."""
        ...

    async def open_queue(self, queue: str, ack_wait: float) -> TaskQueue:
        """The task queue ``queue``, shared by every worker that serves it."""
        ...

    def hold(self, run_id: str) -> AbstractAsyncContextManager[None]:
        """While entered, say that this process holds run ``run_id`` (an eager start,
        ADR 17): the scheduler asks before it hands the run to the queue."""
        ...

    async def close(self) -> None: ...
