"""Count and time every request by route, and answer ``internal`` for any unhandled error."""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import Counter, Histogram
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infrastructure.nats.command_service import error_body

log = logging.getLogger("ledgerflow.api")

REQUESTS = Counter(
    "ledgerflow_http_requests_total",
    "HTTP requests answered by the API, by route template and status",
    ["method", "route", "status"],
)
REQUEST_SECONDS = Histogram(
    "ledgerflow_http_request_seconds",
    "Seconds from an HTTP request's arrival to its response",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

UNMATCHED = "unmatched"
"""The route label of requests no route matched: raw paths would make unbounded series."""


class ObserveRequests:
    """Pure ASGI middleware (streaming-safe): metrics per route, and the 500 of last resort."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500
        started = False

        async def observed_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except Exception:
            log.exception("%s %s failed", scope["method"], scope["path"])
            if started:
                raise  # too late for an error body: the server drops the connection
            status = 500
            await _send_internal(send)
        finally:
            route = scope.get("route")
            template = route.path if isinstance(route, BaseRoute) and hasattr(route, "path") else ""
            label = template or UNMATCHED
            REQUESTS.labels(method=scope["method"], route=label, status=str(status)).inc()
            REQUEST_SECONDS.labels(method=scope["method"], route=label).observe(
                time.perf_counter() - began
            )


async def _send_internal(send: Send) -> None:
    body = json.dumps(error_body("internal", "internal error")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
