"""The CLI's client of the HTTP API: commands through ``POST /commands``, reads from ``/runs``."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import httpx

ENDED = frozenset({"completed", "failed", "cancelled"})
"""Statuses a run never leaves on its own (an operator may retry a failed one)."""

CONNECT_TIMEOUT = 3.0
"""Seconds to wait for the API to accept a connection before calling it unreachable."""
REQUEST_TIMEOUT = 30.0
"""Seconds to wait for an answer: the API itself waits up to 10 s for a command's reply and
5 s for a read model to reach ``min_position``, so this outlasts both."""

FIRST_POLL = 0.05
MAX_POLL = 1.0
"""Seconds between two looks at a run being waited for: from FIRST_POLL, x1.5, to MAX_POLL."""

TRANSIENT = frozenset({"unavailable", "projection_behind"})
"""Error codes that a wait rides out until its deadline (the API answers 503 for them)."""


class ApiError(Exception):
    """The API answered with an error body (or could not be asked): its code and message."""

    def __init__(
        self, code: str, message: str, details: list[Any] | None = None, status: int | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.details, self.status = code, message, details or [], status


class ApiUnreachableError(ApiError):
    """Nothing answers at the API's URL (refused, unresolvable, or no answer in time)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__("unavailable", f"cannot reach the ledgerflow API at {url}: {reason}")
        self.url = url


class WaitTimeoutError(Exception):
    """A run was still going when the wait for its end ran out of time; ``run`` as last seen."""

    def __init__(self, run_id: str, timeout: float, run: dict[str, Any] | None) -> None:
        status = run["status"] if run is not None else "not yet visible"
        super().__init__(f"run {run_id} is still {status} after {timeout:g} s")
        self.run_id, self.timeout, self.run = run_id, timeout, run


class Api:
    """A synchronous client of one ledgerflow API (``ledgerflow serve`` or ``ledgerflow dev``).

    Every method gives back the API's JSON body as it is, or raises ApiError with the API's
    own error code: the CLI prints one or the other.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = REQUEST_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT),
            transport=transport,
            headers={"accept": "application/json"},
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- writes -----------------------------------------------------------------------------

    def command(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send command ``name`` (the NATS command's body); its reply, with ``position``."""
        payload = {k: v for k, v in body.items() if v is not None}
        return self._call("POST", f"/commands/{name}", json=payload)

    # -- reads ------------------------------------------------------------------------------

    def list_runs(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        min_position: int | None = None,
    ) -> dict[str, Any]:
        """One page of runs, newest first: ``{"items": [...], "next_cursor": str | None}``."""
        params = {
            "workflow": workflow,
            "status": status,
            "limit": limit,
            "cursor": cursor,
            "min_position": min_position,
        }
        return self._call("GET", "/runs", params=params)

    def get_run(self, run_id: str, *, min_position: int | None = None) -> dict[str, Any]:
        """A run with its steps; ApiError ``run_not_found`` when there is none."""
        return self._call("GET", f"/runs/{run_id}", params={"min_position": min_position})

    def projections(self) -> list[dict[str, Any]]:
        """Each projection's position, the store's head, the lag and its state."""
        found: list[dict[str, Any]] = self._request("GET", "/projections", listing=True)
        return found

    def rebuild(self, projection: str) -> dict[str, Any]:
        """Start rebuilding ``projection`` in the API's process (``ledgerflow dev``'s
        in-memory read models, or PostgreSQL's beside the live version)."""
        return self._call("POST", f"/projections/{projection}/rebuild")

    def rebuild_outcome(self, projection: str) -> dict[str, Any]:
        """How the last rebuild of ``projection`` started through the API went."""
        return self._call("GET", f"/projections/{projection}/rebuild")

    def run_history(self, run_id: str) -> dict[str, Any]:
        """Every event of a run from the event store: ``{"events": [...]}``."""
        return self._call("GET", f"/runs/{run_id}/history")

    def wait_for_end(
        self,
        run_id: str,
        timeout: float,
        *,
        min_position: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> dict[str, Any]:
        """The run once it has ended; WaitTimeoutError if it has not within ``timeout`` s.

        ``min_position`` (a start's reply) makes the first look see the run at all. Then it
        polls with a short backoff: the API offers no push, and a CLI waits on one run only.
        """
        deadline = time.monotonic() + timeout
        interval = FIRST_POLL
        run: dict[str, Any] | None = None
        while True:
            try:
                run = self.get_run(run_id, min_position=min_position)
            except ApiError as e:
                if e.code not in TRANSIENT or isinstance(e, ApiUnreachableError):
                    raise
            else:
                min_position = None  # reached once: later looks need not wait for it
                if run["status"] in ENDED:
                    return run
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeoutError(run_id, timeout, run)
            sleep(min(interval, left))
            interval = min(interval * 1.5, MAX_POLL)

    # -- internals --------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = self._request(method, path, params=params, json=json)
        return body

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: dict[str, Any] | None = None,
        listing: bool = False,
    ) -> Any:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(method, path, params=query, json=json)
        except httpx.TimeoutException as e:
            if isinstance(e, httpx.ConnectTimeout):
                raise ApiUnreachableError(self.base_url, "no answer to connect") from e
            # A command may have been applied: the reply, not the request, was lost.
            maybe = "; the command may have been applied" if method == "POST" else ""
            raise ApiError(
                "unavailable",
                f"{method} {self.base_url}{path}: no answer within {self.timeout:g} s{maybe}",
            ) from e
        except httpx.TransportError as e:
            raise ApiUnreachableError(self.base_url, _reason(e)) from e
        return _body(response, listing=listing)


def _body(response: httpx.Response, *, listing: bool = False) -> Any:
    """The JSON body of a 2xx answer (an object, or a list where ``listing``); the error
    body of any other, raised as ApiError."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if listing and response.is_success and isinstance(body, list):
        return body
    where = f"{response.request.method} {response.request.url}"
    if not isinstance(body, dict):
        raise ApiError(
            "unavailable",
            f"{where} answered {response.status_code} without a JSON object: "
            "is a ledgerflow API listening there?",
            status=response.status_code,
        )
    if response.is_success and body.get("ok") is not False:
        return body
    error = body.get("error")
    if not isinstance(error, dict):
        raise ApiError(
            "internal" if response.status_code >= 500 else "invalid_command",
            f"{where} answered {response.status_code}: {body}",
            status=response.status_code,
        )
    details = error.get("details")
    raise ApiError(
        str(error.get("code") or "internal"),
        str(error.get("message") or ""),
        details if isinstance(details, list) else [],
        status=response.status_code,
    )


def _reason(error: httpx.TransportError) -> str:
    """What failed (``[Errno 111] Connection refused``), or at least the error's kind."""
    return str(error) or type(error).__name__
