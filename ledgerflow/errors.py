"""The SDK's exceptions: what workflow code raises and meets, and refused commands."""

from __future__ import annotations

from typing import Any

from domain.errors import (
    ConcurrencyConflictError,
    DomainError,
    InvalidCommandError,
    InvalidStateError,
    RunNotFoundError,
    UnknownWorkflowError,
)
from ledgerflow._details import detail_line


class NonRetryableError(Exception):
    """Raise it from a step to fail the step at once, whatever its retry policy says."""


class StepFailedError(Exception):
    """A step failed for good (no attempt left, or not retryable): raised into the workflow."""

    def __init__(self, step: str, type: str, message: str) -> None:
        super().__init__(f"step {step!r} failed: {type}: {message}")
        self.step, self.type, self.message = step, type, message


class ChildFailedError(Exception):
    """A child run (``ctx.invoke``) failed or was cancelled: raised into the parent."""

    def __init__(self, name: str, type: str, message: str) -> None:
        super().__init__(f"child {name!r} failed: {type}: {message}")
        self.name, self.type, self.message = name, type, message


class RunFailedError(Exception):
    """``Client.result``: the run ended without an output (failed or cancelled)."""

    def __init__(self, run_id: str, status: str, error: dict[str, Any] | None) -> None:
        error = error or {}
        kind, message = error.get("type", status), error.get("message", "")
        super().__init__(f"run {run_id} {status}: {kind}: {message}")
        self.run_id, self.status, self.error = run_id, status, error


class CommandError(Exception):
    """A command was refused with a code the domain has no exception class for."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


_BY_CODE: dict[str, type[DomainError]] = {
    "invalid_command": InvalidCommandError,
    "invalid_state": InvalidStateError,
    "run_not_found": RunNotFoundError,
    "unknown_workflow": UnknownWorkflowError,
    "conflict": ConcurrencyConflictError,
}


def error_for(code: str, message: str, details: list[Any] | None = None) -> Exception:
    """The exception a refused command raises: a DomainError subclass when there is one.

    The fields a refusal's details name (pydantic's ``loc`` and ``msg``) are added to
    its message, so that a caller learns what was wrong with its request.
    """
    if fields := _fields(details or []):
        message = f"{message}: {fields}"
    kind = _BY_CODE.get(code)
    if kind is None:
        return CommandError(code, message)
    error = kind.__new__(kind)
    DomainError.__init__(error, message)  # the subclasses' own constructors want ids
    error.reason = reason_of(details or [])
    return error


def checked(reply: dict[str, Any]) -> dict[str, Any]:
    """A command's reply body when it was applied; its refusal raised as an exception."""
    if not reply.get("ok"):
        error = reply.get("error") or {}
        raise error_for(
            str(error.get("code", "internal")),
            str(error.get("message", "")),
            error.get("details") or [],
        )
    return reply


def _fields(details: list[Any]) -> str:
    """``"loc.of.field: what is wrong; ..."`` for the details that say so."""
    return "; ".join(line for detail in details if (line := detail_line(detail)))


def reason_of(details: list[Any]) -> str | None:
    """The stable reason a refusal's details carry (``superseded``, ``retries_exhausted``)."""
    for detail in details:
        if isinstance(detail, dict) and isinstance(detail.get("reason"), str):
            return str(detail["reason"])
    return None


def is_superseded(error: Exception) -> bool:
    """A worker's hand-off is stale: the run was dispatched again (``SupersededError``)."""
    return isinstance(error, InvalidStateError) and error.reason == "superseded"
