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
