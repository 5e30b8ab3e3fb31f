"""The embedded engine of ``ledgerflow dev``: what it owes beyond the shared scenarios.

Its store is the one source of truth, so a restart (a crash, Ctrl-C) loses nothing: the
read models and the scheduler are read back from the log, hand-offs in flight are made
again, and a command applied before the restart is still applied once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from infrastructure.embedded.dev import embedded
from infrastructure.embedded.engine import Engine
from infrastructure.settings import Settings
from ledgerflow import Flow, RunContext
from services import commands as c
from services.clock import ManualClock
from tests.support import waiting
from tests.support.servers import free_port

flow = Flow("embedded")


@flow.workflow()
async def nap(ctx: RunContext, data: dict[str, Any]) -> str:
    first = await ctx.step("before", lambda: "before")
    await ctx.sleep("nap", timedelta(hours=1))
    return first + "+" + await ctx.step("after", lambda: "after")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(database_url=f"sqlite:///{tmp_path}/dev.db", api_port=free_port())


def test_a_sleeping_run_wakes_and_completes_after_a_restart(settings: Settings) -> None:
    clock = ManualClock(datetime.now(tz=UTC))

    async def main() -> None:
        async with embedded(settings, [flow], clock=clock) as dev:
            run_id = await dev.client.start(nap, {})
            await waiting.until(_is(dev.engine, run_id, "sleeping"), "the run to sleep", 10)
            before = dev.engine.read_models.views.run(_uuid(run_id))
        async with embedded(settings, [flow], clock=clock) as dev:
            again = dev.engine.read_models.views.run(_uuid(run_id))
            assert again == before  # read back from the log, not remembered
            clock.advance(timedelta(hours=2))  # the timer was read back too
            assert await dev.client.result(run_id, timeout=10) == "before+after"

    asyncio.run(main())


def test_a_run_started_with_no_worker_is_handed_off_after_a_restart(settings: Settings) -> None:
    async def main() -> None:
        async with embedded(settings, [flow]) as dev:
            pass  # registers the workflow
        async with embedded(settings, []) as dev:
            run_id = await dev.client.start(nap, {})
            # No worker serves it: it stays queued, its hand-off waiting in the engine.
            await waiting.until(_is(dev.engine, run_id, "queued"), "the run in the model", 10)
        clock = ManualClock(datetime.now(tz=UTC) + timedelta(hours=2))
        async with embedded(settings, [flow], clock=clock) as dev:
            await waiting.until(_is(dev.engine, run_id, "sleeping"), "the nap", 10)
            clock.advance(timedelta(hours=2))
            assert await dev.client.result(run_id, timeout=10) == "before+after"

    asyncio.run(main())


def test_a_command_applied_before_a_restart_is_answered_not_applied_again(
    settings: Settings,
) -> None:
    async def main() -> None:
        async with embedded(settings, [flow]) as dev:
            first = await dev.client.command(
                "start_run", {"workflow": "nap", "input": {}, "command_id": "once"}
            )
        async with embedded(settings, [flow]) as dev:
            run_id = str(first["run_id"])
            await waiting.until(_is(dev.engine, run_id, "sleeping"), "the nap", 10)
            settled = dev.engine.position  # nothing moves until the hour-long nap ends
            again = await dev.client.command(
                "start_run", {"workflow": "nap", "input": {"other": 1}, "command_id": "once"}
            )
            assert again == first
            assert dev.engine.position == settled  # answered, nothing appended
            assert len(dev.engine.read_models.views.runs) == 1

    asyncio.run(main())


def test_a_rebuild_gives_the_same_read_models_as_following_the_log(settings: Settings) -> None:
    clock = ManualClock(datetime.now(tz=UTC))

    async def main() -> None:
        async with embedded(settings, [flow], clock=clock) as dev:
            ids = [await dev.client.start(nap, {"n": n}) for n in range(5)]
            for run_id in ids:
                await waiting.until(_is(dev.engine, run_id, "sleeping"), "naps", 10)
            clock.advance(timedelta(hours=2))
            for run_id in ids[:3]:
                await dev.client.result(run_id, timeout=10)
            await dev.engine.execute(c.RegisterWorkflow(name="spare"))
            live = dev.engine.read_models
            await dev.engine.rebuild()
            rebuilt = dev.engine.read_models
            assert rebuilt is not live
            assert rebuilt.views == live.views
            assert rebuilt.positions == live.positions

    asyncio.run(main())


def _uuid(run_id: str) -> UUID:
    return UUID(run_id)


def _status(engine: Engine, run_id: str) -> str:
    row = engine.read_models.views.runs.get(_uuid(run_id))
    return row.status if row else "missing"


def _is(engine: Engine, run_id: str, expected: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return _status(engine, run_id) == expected

    return check
