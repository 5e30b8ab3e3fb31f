"""Store-and-replay helpers: round-trip events through the real eventsourcing mapper."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, CanMutateAggregate
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    Mapper,
    UUIDAsHex,
)


def make_mapper() -> Mapper[UUID]:
    transcoder = JSONTranscoder()
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
        transcoder.register(transcoding)
    return Mapper(transcoder=transcoder)


def replay(events: Sequence[Any], mapper: Mapper[UUID]) -> Aggregate | None:
    """Rebuild an aggregate from its events after a trip through the stored (JSON) form."""
    aggregate: Aggregate | None = None
    for domain_event in events:
        stored = mapper.to_stored_event(domain_event)
        loaded = mapper.to_domain_event(stored)
        assert isinstance(loaded, CanMutateAggregate)
        aggregate = loaded.mutate(aggregate)
    return aggregate


def state_of(aggregate: Aggregate) -> dict[str, Any]:
    """The aggregate's state, without the transient list of pending events."""
    return {k: v for k, v in vars(aggregate).items() if k != "_pending_events"}
