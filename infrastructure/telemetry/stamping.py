"""Keep, in each stored event, the trace context of the command that appended it (ADR 11)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from uuid import UUID

from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent

from projections.records import TRACEPARENT_KEY

_STAMPS: ContextVar[Mapping[UUID, str] | None] = ContextVar("ledgerflow_stamps", default=None)


@contextlib.contextmanager
def stamping(traceparents: Mapping[UUID, str]) -> Iterator[None]:
    """Events of these aggregates saved inside (in this context, or a thread started in it
    with ``asyncio.to_thread``) keep the given ``traceparent``."""
    token = _STAMPS.set(traceparents or None)
    try:
        yield
    finally:
        _STAMPS.reset(token)


class StampingMapper(Mapper[UUID]):
    """eventsourcing's Mapper, plus a ``_traceparent`` key in the stored state when the
    saving command is traced. Reading needs nothing: the key becomes an attribute that
    the aggregates' mutators ignore, and EventRecords take it out of the event's data."""

    def to_stored_event(self, domain_event: DomainEventProtocol[UUID]) -> StoredEvent:
        stamps = _STAMPS.get()
        if stamps is None:
            return super().to_stored_event(domain_event)
        traceparent = stamps.get(domain_event.originator_id)
        if traceparent is None:
            return super().to_stored_event(domain_event)
        # A copy with one more attribute (as eventsourcing itself rebuilds events), so the
        # event the aggregate applied is left as it was.
        stamped = object.__new__(type(domain_event))
        object.__setattr__(
            stamped, "__dict__", {**vars(domain_event), TRACEPARENT_KEY: traceparent}
        )
        return super().to_stored_event(stamped)
