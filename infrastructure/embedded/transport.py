"""The embedded engine seen from the SDK (a Transport) and from the API (a CommandGateway
and a Rebuilder)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

from domain.values import JSON
from infrastructure.embedded.engine import Engine
from infrastructure.http.context import RebuildOutcome
from infrastructure.http.errors import ApiError
from ledgerflow._ports import TaskQueue
from ledgerflow.errors import checked
from projections.catalog import PROJECTIONS, UnknownProjectionError, projection_names

log = logging.getLogger("ledgerflow.engine")


class EngineTransport:
    """What a Client or a Worker uses in ``ledgerflow dev``: the engine, in process.

    Bodies go through JSON exactly as they would over NATS, so the SDK sees the same
    validation, the same replies and the same errors on either backend.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def command(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        payload = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
        return checked(json.loads(json.dumps(await self.engine.send(name, payload))))

    def run_ends(self, run_id: str) -> AbstractAsyncContextManager[asyncio.Event]:
        return self.engine.run_ends(run_id)

    def hold(self, run_id: str) -> AbstractAsyncContextManager[None]:
        return self.engine.hold(run_id)

    async def open_queue(self, queue: str, ack_wait: float) -> TaskQueue:
        found = self.engine.queue(queue)
        found.ack_wait = ack_wait
        return found

    async def close(self) -> None:
        """The engine outlives its clients and workers."""


class EngineGateway:
    """The API's commands, applied by the engine in process."""

    dependency = "engine"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def send(self, name: str, payload: bytes) -> dict[str, JSON]:
        return await self.engine.send(name, payload)

    async def check(self, timeout: float) -> None:
        if self.engine.app is None:
            raise ConnectionError("the embedded engine is not running")


class EngineRebuilder:
    """The UI's rebuild button under ``ledgerflow dev``: the engine reads the whole log
    into fresh in-memory read models and swaps them in (every projection at once)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._outcomes: dict[str, RebuildOutcome] = {}
        self._running: asyncio.Task[None] | None = None

    async def rebuild(self, projection: str) -> None:
        try:
            projection_names(projection)
        except UnknownProjectionError as e:
            raise ApiError("not_found", str(e)) from None
        if self._running is not None and not self._running.done():
            raise ApiError("conflict", "the read models are being rebuilt already")
        names = list(PROJECTIONS)
        started = datetime.now(UTC)
        for name in names:
            self._outcomes[name] = RebuildOutcome(name, "running", started)
        self._running = asyncio.create_task(self._run(names, started), name="engine-rebuild")

    async def _run(self, names: list[str], started: datetime) -> None:
        error: str | None = None
        try:
            await self.engine.rebuild()
        except Exception as e:  # the outcome reports it; the API stays up
            log.exception("rebuilding the read models failed")
            error = str(e) or type(e).__name__
        for name in names:
            self._outcomes[name] = RebuildOutcome(
                name, "failed" if error else "done", started, datetime.now(UTC), error
            )

    def outcomes(self) -> Mapping[str, RebuildOutcome]:
        return dict(self._outcomes)
