"""Read-your-writes: wait, bounded, until the projections behind a query reach a position."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping

from infrastructure.http.errors import ApiError

log = logging.getLogger("ledgerflow.api")

PositionReader = Callable[[], Awaitable[Mapping[str, int]]]
"""Reads the position each live projection has reached."""


class PositionWatcher:
    """Polls the projections' positions while anyone waits on one, and wakes the waiters.

    However many requests wait, one poller queries the database once per ``interval``, and
    nobody polls when nobody waits. Positions only grow (a rebuild swaps in a version only
    once it has caught up), so a position seen once stays reached.
    """

    def __init__(self, read: PositionReader, *, interval: float = 0.025) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._read = read
        self._interval = interval
        self._positions: dict[str, int] = {}
        self._error: BaseException | None = None
        self._changed = asyncio.Condition()
        self._waiting = 0
        self._poller: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """How many requests are waiting right now."""
        return self._waiting

    def reached(self, projections: Iterable[str]) -> dict[str, int]:
        """The last position seen of each of ``projections`` (0: none seen yet)."""
        return {name: self._positions.get(name, 0) for name in projections}

    async def wait(self, projections: Iterable[str], position: int, timeout: float) -> None:
        """Return once every one of ``projections`` has reached ``position``; else raise
        ApiError ``projection_behind`` (or ``unavailable`` if positions cannot be read)
        after ``timeout`` seconds."""
        names = tuple(projections)

        def there() -> bool:
            return all(p >= position for p in self.reached(names).values())

        if there():
            return
        self._waiting += 1
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll(), name="projection-positions")
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(there)
        except TimeoutError:
            raise self._behind(names, position) from None
        finally:
            self._waiting -= 1

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    def _behind(self, names: tuple[str, ...], position: int) -> ApiError:
        if self._error is not None:
            return ApiError(
                "unavailable",
                f"cannot read the projections' positions: {self._error}",
                [{"dependency": "database"}],
            )
        behind = {n: p for n, p in self.reached(names).items() if p < position}
        return ApiError(
            "projection_behind",
            f"{', '.join(behind)} did not reach position {position} in time; retry",
            [{"projection": n, "position": p, "wanted": position} for n, p in behind.items()],
        )

    async def _poll(self) -> None:
        try:
            while self._waiting:
                try:
                    positions = await self._read()
                except Exception as error:  # the waiters answer 503 at their deadline
                    if self._error is None:
                        log.warning("cannot read projection positions: %s", error)
                    self._error = error
                else:
                    self._error = None
                    async with self._changed:
                        self._positions = dict(positions)
                        self._changed.notify_all()
                if self._waiting:
                    await asyncio.sleep(self._interval)
        finally:
            self._poller = None
