"""Run service roles in one process until SIGTERM/SIGINT, then stop each one cleanly."""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from infrastructure.settings import Settings
from ledgerflow._telemetry import as_role

log = logging.getLogger("ledgerflow.serve")

ROLES: dict[str, str] = {
    "commands": "infrastructure.nats.command_service",
    "relay": "infrastructure.nats.relay",
    "projections": "infrastructure.projection_runner",
    "api": "infrastructure.http.app",
    "scheduler": "infrastructure.scheduler_runner",
}
"""Each role's module; it exposes ``async def run(settings, stop) -> None``."""

RoleRunner = Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]]


def runner(role: str) -> RoleRunner:
    run: RoleRunner = importlib.import_module(ROLES[role]).run
    return run


async def serve(settings: Settings, roles: Sequence[str]) -> None:
    """Run ``roles`` until a signal; a role that crashes stops the others, then re-raises."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stopping, stop, sig)
    tasks: dict[asyncio.Task[None], str] = {
        asyncio.create_task(as_role(role, runner(role)(settings, stop)), name=role): role
        for role in roles
    }
    log.info("serving %s (nats %s)", ", ".join(roles), settings.nats_url)
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    failed = [t for t in done if not t.cancelled() and t.exception() is not None]
    if failed or not stop.is_set():
        stop.set()  # one role ended on its own: take the rest down too
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for task, result in zip(tasks, results, strict=True):
        if isinstance(result, BaseException):
            log.error("role %s failed: %s", tasks[task], result)
    if failed:
        raise _leaf(failed[0].exception())
    log.info("stopped")


def _leaf(error: BaseException | None) -> BaseException:
    """The one error inside nested exception groups (a role's TaskGroup), else the error."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    assert error is not None
    return error


def _stopping(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("%s: finishing the work in hand", sig.name)
    stop.set()
