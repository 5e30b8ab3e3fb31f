"""AggregateCache: recently used aggregates at their last committed version, bounded (LRU)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

from eventsourcing.domain import Aggregate
from eventsourcing.persistence import StoredEvent

DEFAULT_SIZE = 4096
"""Aggregates kept: every run in flight, with room to spare (a run is a few kB)."""


class AggregateCache:
    """Aggregates as they were last committed, so a command needn't replay a whole history.

    A unit of work *takes* an aggregate out and owns it while it decides; only after its
    batch is saved does it *put* it back. So an aggregate that a refused decision changed,
    or that belongs to a batch that rolled back, is never seen again: whatever was not
    committed simply never returns here. The taker brings what it took up to date with
    the events stored after its version (another instance may have written meanwhile),
    so the cache may be behind the store, never ahead of it nor beside it.
    """

    def __init__(self, maxsize: int = DEFAULT_SIZE) -> None:
        if maxsize < 0:
            raise ValueError("the cache size must be 0 (no cache) or more")
        self.maxsize = maxsize
        self._items: OrderedDict[UUID, Aggregate] = OrderedDict()
        self._lock = threading.Lock()  # the command service decides in a thread pool
        self.hits = 0
        self.misses = 0

    def take(self, aggregate_id: UUID) -> Aggregate | None:
        """The cached aggregate, now the caller's alone (None when not cached)."""
        with self._lock:
            aggregate = self._items.pop(aggregate_id, None)
            if aggregate is None:
                self.misses += 1
            else:
                self.hits += 1
            return aggregate

    def put(self, aggregates: Iterable[Aggregate]) -> None:
        """Keep committed aggregates (none may have pending events); the oldest go first."""
        if not self.maxsize:
            return
        with self._lock:
            for aggregate in aggregates:
                if aggregate.pending_events:
                    raise ValueError(f"aggregate {aggregate.id} has uncommitted events")
                cached = self._items.get(aggregate.id)
                if cached is not None and cached.version > aggregate.version:
                    continue  # a newer commit came back first: keep it
                self._items[aggregate.id] = aggregate
                self._items.move_to_end(aggregate.id)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def __contains__(self, aggregate_id: object) -> bool:
        return aggregate_id in self._items

    def __len__(self) -> int:
        return len(self._items)


def project(aggregate: Aggregate | None, events: Iterable[Any]) -> Aggregate | None:
    """Apply ``events`` in order: eventsourcing's ``project_aggregate`` without its per-event
    ``isinstance`` check against a runtime Protocol, which costs more than the mutation."""
    for event in events:
        aggregate = event.mutate(aggregate)
    return aggregate


@runtime_checkable
class EventsAfter(Protocol):
    def select_events_after(self, versions: Sequence[tuple[UUID, int]]) -> list[StoredEvent]:
        """In one query, the events of each aggregate after its version, in order."""
        ...
