"""ledgerflow: durable workflows for Python on an event-sourced core (the public API)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from domain.errors import (
        ConcurrencyConflictError,
        DomainError,
        InvalidCommandError,
        InvalidStateError,
        RunNotActiveError,
        RunNotFoundError,
        UnknownWorkflowError,
    )
    from domain.values import Concurrency, RetryPolicy, Timeouts
    from domain.workflow_run import RunStatus
    from ledgerflow.client import Client
    from ledgerflow.context import RunContext
    from ledgerflow.errors import (
        ChildFailedError,
        CommandError,
        NonRetryableError,
        RunFailedError,
        StepFailedError,
    )
    from ledgerflow.flow import Flow, Workflow
    from ledgerflow.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "ChildFailedError",
    "Client",
    "CommandError",
    "Concurrency",
    "ConcurrencyConflictError",
    "DomainError",
    "Flow",
    "InvalidCommandError",
    "InvalidStateError",
    "NonRetryableError",
    "RetryPolicy",
    "RunContext",
    "RunFailedError",
    "RunNotActiveError",
    "RunNotFoundError",
    "RunStatus",
    "StepFailedError",
    "Timeouts",
    "UnknownWorkflowError",
    "Worker",
    "Workflow",
    "__version__",
]

_HOMES = {
    "ConcurrencyConflictError": "domain.errors",
    "DomainError": "domain.errors",
    "InvalidCommandError": "domain.errors",
    "InvalidStateError": "domain.errors",
    "RunNotActiveError": "domain.errors",
    "RunNotFoundError": "domain.errors",
    "UnknownWorkflowError": "domain.errors",
    "Concurrency": "domain.values",
    "RetryPolicy": "domain.values",
    "Timeouts": "domain.values",
    "RunStatus": "domain.workflow_run",
    "Client": "ledgerflow.client",
    "RunContext": "ledgerflow.context",
    "ChildFailedError": "ledgerflow.errors",
    "CommandError": "ledgerflow.errors",
    "NonRetryableError": "ledgerflow.errors",
    "RunFailedError": "ledgerflow.errors",
    "StepFailedError": "ledgerflow.errors",
    "Flow": "ledgerflow.flow",
    "Workflow": "ledgerflow.flow",
    "Worker": "ledgerflow.worker",
}
"""Where each public name lives: imported on first use, so that the CLI starts quickly."""


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ledgerflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once only
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
