"""The API's error codes map to HTTP statuses, and read-your-writes waits answer or refuse."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from domain.errors import DomainError
from infrastructure.http.errors import ApiError, status_of
from infrastructure.http.freshness import PositionWatcher

CONTRACT = {
    "invalid_command": 400,
    "too_large": 413,
    "unauthorized": 401,
    "run_not_found": 404,
    "unknown_workflow": 404,
    "not_found": 404,
    "invalid_state": 409,
    "conflict": 409,
    "unavailable": 503,
    "projection_behind": 503,
    "internal": 500,
}


def _domain_codes() -> set[str]:
    found, todo = set(), [DomainError]
    while todo:
        kind = todo.pop()
        found.add(kind.code)
        todo.extend(kind.__subclasses__())
    return found


def test_every_error_code_of_the_contract_has_its_status() -> None:
    assert {code: status_of(code) for code in CONTRACT} == CONTRACT


def test_every_domain_refusal_is_a_client_error() -> None:
    assert {code: 400 <= status_of(code) < 500 for code in _domain_codes()} == dict.fromkeys(
        _domain_codes(), True
    )


def test_an_unknown_code_is_the_servers_fault() -> None:
    assert status_of("something_new") == 500
    assert ApiError("run_not_found", "gone").status == 404
    assert ApiError("internal", "boom", status=502).status == 502


class Positions:
    """A position reader whose projections advance by ``step`` on every read."""

    def __init__(self, step: int = 0, fail: bool = False) -> None:
        self.reads = 0
        self.step = step
        self.fail = fail

    async def __call__(self) -> Mapping[str, int]:
        self.reads += 1
        if self.fail:
            raise ConnectionError("database down")
        return {"runs": self.reads * self.step, "workflows": self.reads * self.step}


def test_waiters_share_one_poller_and_are_released_when_the_position_is_reached() -> None:
    async def scenario() -> None:
        positions = Positions(step=1)
        watcher = PositionWatcher(positions, interval=0.01)
        await asyncio.gather(*(watcher.wait(["runs", "workflows"], 5, 10) for _ in range(50)))
        # 50 waiters, one read per round (a sixth if the poller wakes before they leave)
        reads = positions.reads
        assert reads in (5, 6)
        await watcher.wait(["runs"], 3, 10)  # already seen: no read at all
        assert positions.reads == reads
        assert watcher.waiting == 0
        await watcher.close()

    asyncio.run(scenario())


def test_a_position_never_reached_is_projection_behind_with_what_was_reached() -> None:
    async def scenario() -> None:
        watcher = PositionWatcher(Positions(step=0), interval=0.001)
        with pytest.raises(ApiError) as raised:
            await watcher.wait(["runs", "workflows"], 7, 0.05)
        assert (raised.value.code, raised.value.status) == ("projection_behind", 503)
        assert raised.value.details == [
            {"projection": "runs", "position": 0, "wanted": 7},
            {"projection": "workflows", "position": 0, "wanted": 7},
        ]
        await watcher.close()

    asyncio.run(scenario())


def test_positions_that_cannot_be_read_make_a_wait_unavailable() -> None:
    async def scenario() -> None:
        watcher = PositionWatcher(Positions(fail=True), interval=0.001)
        with pytest.raises(ApiError) as raised:
            await watcher.wait(["runs"], 1, 0.05)
        assert raised.value.code == "unavailable"
        assert raised.value.details == [{"dependency": "database"}]
        await watcher.close()

    asyncio.run(scenario())
