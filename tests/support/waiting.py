"""Wait on a condition with a deadline (never a bare sleep as synchronisation)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

POLL = 0.02


async def until(
    condition: Callable[[], Awaitable[bool]],
    what: str,
    timeout: float = 15.0,
    watch: asyncio.Task[None] | None = None,
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` s, or if ``watch`` ends."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if watch is not None and watch.done():
            watch.result()  # raises what ended it
            raise AssertionError(f"stopped while waiting for {what}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(POLL)
