"""Every projection ledgerflow maintains, by name (the name its tracking row and consumer use)."""

from __future__ import annotations

from typing import Any

from projections.inbound_events import InboundEventProjection
from projections.projection import Projection
from projections.runs import RunProjection
from projections.workflows import WorkflowProjection

PROJECTIONS: dict[str, type[Projection[Any]]] = {
    RunProjection.name: RunProjection,
    WorkflowProjection.name: WorkflowProjection,
    InboundEventProjection.name: InboundEventProjection,
}
"""Name -> projection class, in the order they are built and rebuilt."""


class UnknownProjectionError(LookupError):
    """No projection has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no projection {name!r}; known: {', '.join(PROJECTIONS)}")
        self.name = name


def projection_names(name: str | None = None) -> list[str]:
    """``[name]`` if it is a projection's name, every name when ``name`` is None."""
    if name is None:
        return list(PROJECTIONS)
    if name not in PROJECTIONS:
        raise UnknownProjectionError(name)
    return [name]
