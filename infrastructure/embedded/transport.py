"""The embedded engine seen from the SDK (a Transport) and from the API (a CommandGateway)."""

from __future__ import annotations

import asyncio
import json
from contextlib import AbstractAsyncContextManager
from typing import Any

from domain.values import JSON
from infrastructure.embedded.engine import Engine
from ledgerflow._ports import TaskQueue
from ledgerflow.errors import checked


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
