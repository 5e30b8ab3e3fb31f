"""Projection rebuilds started from the API, run by the CLI's rebuild code in a thread each."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime

from infrastructure.http.context import RebuildOutcome
from infrastructure.http.errors import ApiError
from infrastructure.postgres import read_models
from infrastructure.postgres.read_models import Progress
from infrastructure.settings import Settings
from projections.catalog import UnknownProjectionError, projection_names

log = logging.getLogger("ledgerflow.api")

RebuildFunction = Callable[[Settings, str, Progress], None]
"""``rebuild(settings, projection, progress)``: read_models.rebuild's shape."""


class _StoppedError(Exception):
    """Raised from the progress callback to end a rebuild between two batches."""


def _rebuild(settings: Settings, projection: str, progress: Progress) -> None:
    read_models.rebuild(settings, projection, progress)


class PostgresRebuilder:
    """Runs ``ledgerflow projections rebuild NAME``'s code in a background thread.

    The rebuild has connections of its own and builds the new version beside the live one,
    so queries go on being answered meanwhile; whatever it raises is kept as its outcome,
    never raised into the API. :meth:`close` interrupts rebuilds between two batches (the
    next rebuild drops what an interrupted one left).
    """

    def __init__(self, settings: Settings, rebuild: RebuildFunction = _rebuild) -> None:
        self._settings = settings
        self._rebuild = rebuild
        self._lock = threading.Lock()
        self._outcomes: dict[str, RebuildOutcome] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._stopping = threading.Event()

    async def rebuild(self, projection: str) -> None:
        try:
            projection_names(projection)
        except UnknownProjectionError as e:
            raise ApiError("not_found", str(e)) from None
        with self._lock:
            if self._stopping.is_set():
                raise ApiError("unavailable", "the API is stopping; rebuild later")
            if projection in self._threads:
                raise ApiError("conflict", f"projection {projection!r} is being rebuilt already")
            self._outcomes[projection] = RebuildOutcome(projection, "running", _now())
            thread = threading.Thread(
                target=self._run, args=(projection,), name=f"rebuild-{projection}", daemon=True
            )
            self._threads[projection] = thread
        thread.start()
        log.info("rebuilding projection %s", projection)

    def outcomes(self) -> Mapping[str, RebuildOutcome]:
        with self._lock:
            return dict(self._outcomes)

    async def close(self) -> None:
        """Interrupt the rebuilds in progress and wait for their threads to end."""
        self._stopping.set()
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            await asyncio.to_thread(thread.join)

    def _progress(self, position: int, head: int) -> None:
        if self._stopping.is_set():
            raise _StoppedError

    def _run(self, projection: str) -> None:
        error: str | None = None
        try:
            self._rebuild(self._settings, projection, self._progress)
        except _StoppedError:
            error = "interrupted: the API stopped"
        except Exception as e:  # the outcome reports it; the API stays up
            log.exception("rebuilding projection %s failed", projection)
            error = str(e) or type(e).__name__
        with self._lock:
            started = self._outcomes[projection]
            self._outcomes[projection] = replace(
                started, state="failed" if error else "done", finished_at=_now(), error=error
            )
            del self._threads[projection]
        log.info("rebuilding projection %s: %s", projection, error or "done")


def _now() -> datetime:
    return datetime.now(UTC)
