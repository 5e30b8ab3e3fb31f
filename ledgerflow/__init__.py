"""ledgerflow: durable workflows for Python on an event-sourced core (the public API)."""

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

__version__ = "0.1.0"

__all__ = [
    "Concurrency",
    "ConcurrencyConflictError",
    "DomainError",
    "InvalidCommandError",
    "InvalidStateError",
    "RetryPolicy",
    "RunNotActiveError",
    "RunNotFoundError",
    "RunStatus",
    "Timeouts",
    "UnknownWorkflowError",
    "__version__",
]
