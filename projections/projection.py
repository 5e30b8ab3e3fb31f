"""The projection framework: handlers per event type, and exactly-once ordering by position."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from projections.records import EventRecord

V = TypeVar("V")
F = TypeVar("F", bound=Callable[..., None])

Backfill = Callable[[int, int], Sequence[EventRecord]]
"""``backfill(after, until)``: the store's records with ``after < position <= until``, in order."""

_HANDLES = "_ledgerflow_handles"


def handles(*qualified_types: str) -> Callable[[F], F]:
    """Mark a projection method as the handler of records of these types.

    Types are ``EventRecord.qualified_type`` values, e.g. ``"WorkflowRun.StepCompleted"``:
    records are plain JSON, not domain-event classes, so dispatch is on the name.
    """

    def mark(method: F) -> F:
        setattr(method, _HANDLES, (*getattr(method, _HANDLES, ()), *qualified_types))
        return method

    return mark


class Projection(Generic[V]):
    """Decides, for each record, which rows of its view change; the view stores them.

    Handlers are deterministic functions of the view's rows and the record. They are not
    idempotent on their own: exactly-once comes from position tracking (:func:`in_order`),
    done by the caller in the same transaction as the view's writes. Records of a type
    without a handler change nothing (the projection stays compatible with new events).
    """

    name: ClassVar[str]
    _handlers: ClassVar[dict[str, Callable[[Any, EventRecord], None]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        handlers: dict[str, Callable[[Any, EventRecord], None]] = {}
        for klass in reversed(cls.__mro__):
            for attribute in vars(klass).values():
                for qualified_type in getattr(attribute, _HANDLES, ()):
                    handlers[qualified_type] = attribute
        cls._handlers = handlers

    def __init__(self, view: V) -> None:
        self.view = view

    @classmethod
    def handled_types(cls) -> frozenset[str]:
        return frozenset(cls._handlers)

    def process(self, record: EventRecord) -> None:
        handler = self._handlers.get(record.qualified_type)
        if handler is not None:
            handler(self, record)


def stored_name(name: str) -> str:
    """A name (step, sleep, wait, child, worker...) as the read models keep it.

    PostgreSQL text cannot hold NUL, which the domain allows in free-text names: every view
    shows it as U+FFFD, and every lookup uses the same form, so later events still find it.
    """
    return name.replace("\x00", "\ufffd") if "\x00" in name else name


class StreamMismatchError(RuntimeError):
    """A delivered record is missing from the store: the stream belongs to another store."""


def in_order(batch: Iterable[EventRecord], position: int, backfill: Backfill) -> list[EventRecord]:
    """The records to apply after tracked ``position``, each exactly once and in log order.

    A record at or below the position reached is a duplicate or a redelivery: skipped. A
    record whose ``prev_position`` is not the position reached follows a gap (a lost or
    purged message): the missing records are read from the store first, so nothing is lost.
    """
    reached = position
    ordered: list[EventRecord] = []
    for record in sorted(batch, key=lambda r: r.position):
        if record.position <= reached:
            continue
        if record.prev_position != reached:
            for missing in backfill(reached, record.position):
                if missing.position > reached:
                    ordered.append(missing)
                    reached = missing.position
            if reached >= record.position:
                continue  # the store's copy of the record itself was applied
            raise StreamMismatchError(
                f"record {record.position} ({record.qualified_type}) is not in the store"
            )
        ordered.append(record)
        reached = record.position
    return ordered
