"""The API's rebuilder runs a rebuild in a thread, keeps its outcome, and never raises it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from infrastructure.http.errors import ApiError
from infrastructure.http.rebuilder import PostgresRebuilder
from infrastructure.postgres.read_models import Progress, RebuildInProgressError
from infrastructure.settings import Settings

WAIT = 5.0


class Rebuilds:
    """A stand-in for read_models.rebuild that goes batch by batch when told to."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        self.error: Exception | None = None
        self.calls: list[str] = []
        self.thread: str | None = None

    def __call__(self, settings: Settings, projection: str, progress: Progress) -> None:
        self.calls.append(projection)
        self.thread = threading.current_thread().name
        self.started.set()
        assert self.go.wait(WAIT)
        progress(1, 2)
        if self.error is not None:
            raise self.error


async def until_ended(rebuilder: PostgresRebuilder, name: str) -> str:
    async with asyncio.timeout(WAIT):
        while (state := rebuilder.outcomes()[name].state) == "running":
            await asyncio.sleep(0.01)
    return state


def test_a_rebuild_runs_in_a_thread_and_one_at_a_time_per_projection() -> None:
    async def scenario() -> None:
        fake = Rebuilds()
        rebuilder = PostgresRebuilder(Settings(), fake)
        await rebuilder.rebuild("runs")
        assert await asyncio.to_thread(fake.started.wait, WAIT)
        assert rebuilder.outcomes()["runs"].state == "running"
        with pytest.raises(ApiError) as again:
            await rebuilder.rebuild("runs")
        assert again.value.code == "conflict"
        fake.go.set()
        assert await until_ended(rebuilder, "runs") == "done"
        assert fake.thread == "rebuild-runs"
        outcome = rebuilder.outcomes()["runs"]
        assert outcome.finished_at is not None and outcome.error is None
        await rebuilder.close()

    asyncio.run(scenario())


def test_a_failed_rebuild_is_an_outcome_not_an_exception() -> None:
    async def scenario() -> None:
        fake = Rebuilds()
        fake.error = RebuildInProgressError("projection 'runs' is being rebuilt by another process")
        fake.go.set()
        rebuilder = PostgresRebuilder(Settings(), fake)
        await rebuilder.rebuild("runs")
        assert await until_ended(rebuilder, "runs") == "failed"
        assert rebuilder.outcomes()["runs"].error == (
            "projection 'runs' is being rebuilt by another process"
        )
        await rebuilder.rebuild("runs")  # a failed rebuild can be started again
        await until_ended(rebuilder, "runs")
        assert fake.calls == ["runs", "runs"]
        await rebuilder.close()

    asyncio.run(scenario())


def test_an_unknown_projection_is_refused_and_closing_interrupts_a_rebuild() -> None:
    async def scenario() -> None:
        fake = Rebuilds()
        rebuilder = PostgresRebuilder(Settings(), fake)
        with pytest.raises(ApiError) as unknown:
            await rebuilder.rebuild("nope")
        assert unknown.value.code == "not_found"

        await rebuilder.rebuild("workflows")
        assert await asyncio.to_thread(fake.started.wait, WAIT)
        closing = asyncio.create_task(rebuilder.close())
        await asyncio.sleep(0)  # close() has said stop and waits on the thread
        fake.go.set()  # its next batch sees the API stopping
        await asyncio.wait_for(closing, WAIT)
        outcome = rebuilder.outcomes()["workflows"]
        assert (outcome.state, outcome.error) == ("failed", "interrupted: the API stopped")
        with pytest.raises(ApiError) as stopping:
            await rebuilder.rebuild("workflows")
        assert stopping.value.code == "unavailable"

    asyncio.run(scenario())
