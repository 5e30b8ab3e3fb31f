"""The API's error bodies, their HTTP statuses, and the handlers that turn exceptions into them."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import psycopg
import psycopg_pool
from eventsourcing.persistence import InterfaceError as StoreInterfaceError
from eventsourcing.persistence import OperationalError as StoreOperationalError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from domain.values import JSON
from infrastructure.nats.command_service import error_body
from infrastructure.postgres.queries import InvalidQueryError
from infrastructure.postgres.read_models import ReadModelsMissingError

log = logging.getLogger("ledgerflow.api")

STATUS_OF_CODE: Mapping[str, int] = {
    "invalid_command": 400,
    "unauthorized": 401,
    "not_found": 404,
    "run_not_found": 404,
    "unknown_workflow": 404,
    "method_not_allowed": 405,
    "invalid_state": 409,
    "conflict": 409,
    "too_large": 413,
    "internal": 500,
    "unavailable": 503,
    "projection_behind": 503,
}
"""The HTTP status of each error code of the contract (DESIGN.md section 4)."""

RETRY_AFTER_SECONDS = 1
"""What a 503 tells clients to wait before trying again."""

UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    psycopg.errors.UndefinedTable,  # the read models were never created
    psycopg_pool.PoolTimeout,
    psycopg_pool.PoolClosed,
    StoreOperationalError,
    StoreInterfaceError,
    ReadModelsMissingError,
)
"""Errors that mean a dependency is down or not set up: 503, never 500."""


def status_of(code: str) -> int:
    """The HTTP status for an error code; an unknown code is the server's fault (500)."""
    return STATUS_OF_CODE.get(code, 500)


class ApiError(Exception):
    """An answer other than 2xx, raised by a handler and rendered as the error body."""

    def __init__(
        self,
        code: str,
        message: str,
        details: Sequence[JSON] = (),
        *,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, list(details)
        self.status = status if status is not None else status_of(code)


def error_response(
    code: str, message: str, details: Sequence[JSON] = (), *, status: int | None = None
) -> JSONResponse:
    status = status if status is not None else status_of(code)
    # A 503 is transient by definition: say when to try again.
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def validation_details(error: RequestValidationError) -> list[JSON]:
    """FastAPI's validation errors in the command service's ``details`` shape."""
    return [
        {
            "loc": [str(part) for part in e.get("loc", ())],
            "msg": e.get("msg"),
            "type": e.get("type"),
        }
        for e in error.errors()
    ]


def install_error_handlers(app: FastAPI) -> None:
    """Every error the routes can meet answers with ``{"ok": false, "error": {...}}``."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.code, exc.message, exc.details, status=exc.status)

    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        # 400 rather than FastAPI's 422: it is the same invalid_command as a bad filter.
        return error_response("invalid_command", "invalid request", validation_details(exc))

    async def invalid_query(_: Request, exc: Exception) -> JSONResponse:
        return error_response("invalid_command", str(exc))

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            code = "not_found"
        elif exc.status_code == 405:
            code = "method_not_allowed"
        else:
            code = "invalid_command" if exc.status_code < 500 else "internal"
        return error_response(code, str(exc.detail), status=exc.status_code)

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s %s: dependency unavailable: %s", request.method, request.url.path, exc)
        if isinstance(exc, ReadModelsMissingError | psycopg.errors.UndefinedTable):
            message = "the read models are missing: run `ledgerflow db init`"
        else:
            message = "the database is unavailable; retry"
        return error_response("unavailable", message, [{"dependency": "database"}])

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(InvalidQueryError, invalid_query)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for error_type in UNAVAILABLE_ERRORS:
        app.add_exception_handler(error_type, unavailable)
