"""A run's state as plain JSON: what a worker needs to replay it deterministically."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from enum import Enum
from typing import Any
from uuid import UUID

from domain.values import JSON
from domain.workflow_run import WorkflowRun


def snapshot_of(run: WorkflowRun) -> dict[str, JSON]:
    """Everything the workflow code may observe on replay, and the hand-off it holds."""
    return {
        "run_id": str(run.id),
        "workflow": run.workflow,
        "key": run.key,
        "input": run.input,
        "status": run.status.value,
        "version": run.version,
        "dispatch": run.dispatches,
        "retry_policy": run.retry_policy.to_json(),
        "timeouts": run.timeouts.to_json(),
        "parent_run_id": _plain(run.parent_run_id),
        "cancel_requested": run.cancel_requested,
        "error": run.error,
        "output": run.output,
        "steps": {name: _plain(asdict(state)) for name, state in run.steps.items()},
        "sleeps": {name: _plain(asdict(state)) for name, state in run.sleeps.items()},
        "waits": {name: _plain(asdict(state)) for name, state in run.waits.items()},
        "children": {name: _plain(asdict(state)) for name, state in run.children.items()},
        "sent_events": {name: str(event_id) for name, event_id in run.sent_events.items()},
        "compensations_pending": run.compensations_pending(),
    }


def _plain(value: Any) -> JSON:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return _plain(value.value)
    return value
