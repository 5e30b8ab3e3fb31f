"""Deterministic identifiers: a repeated start or send lands on the same aggregate."""

from __future__ import annotations

import json
from uuid import UUID, uuid4, uuid5

NAMESPACE = UUID("6f1d2b54-8d3e-5c7a-9b1e-4c2a7d9e0f31")
"""Fixed namespace of every ledgerflow uuid5; changing it would orphan every keyed run."""


def run_id_for(workflow: str, key: str | None) -> UUID:
    """uuid5 of (workflow, key) when a key is given, else a fresh uuid4."""
    if key is None:
        return uuid4()
    return uuid5(NAMESPACE, json.dumps(["run", workflow, key]))


def child_run_id(parent_run_id: UUID, name: str) -> UUID:
    """A child run's id is fixed by its parent and the invoking step's name."""
    return uuid5(NAMESPACE, json.dumps(["child", str(parent_run_id), name]))


def inbound_event_id(external_id: str | None) -> UUID:
    """uuid5 of the sender's event id when given, so a resend is a no-op."""
    if external_id is None:
        return uuid4()
    return uuid5(NAMESPACE, json.dumps(["event", external_id]))


def sent_event_id(run_id: UUID, name: str) -> str:
    """The external id of an event a run sends from its step ``name`` (stable on replay)."""
    return f"{run_id}/{name}"


def workflow_type_id(name: str) -> UUID:
    return uuid5(NAMESPACE, json.dumps(["workflow", name]))
