"""A server span per HTTP request, when tracing: the caller's trace goes on to its commands."""

from __future__ import annotations

from opentelemetry.trace import Span
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infrastructure.telemetry.tracing import http_span
from ledgerflow._telemetry import TRACING


class TraceRequests:
    """Pure ASGI middleware; with tracing off it only passes the request on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not TRACING.enabled:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with http_span(scope["method"], headers) as span:
            try:
                await self.app(scope, receive, observed_send)
            finally:
                if span is not None:
                    _describe(span, scope, status)


def _describe(span: Span, scope: Scope, status: int) -> None:
    route = scope.get("route")
    template = getattr(route, "path", None) if isinstance(route, BaseRoute) else None
    if template:
        span.update_name(f"{scope['method']} {template}")
        span.set_attribute("http.route", template)
    span.set_attribute("http.request.method", scope["method"])
    span.set_attribute("http.response.status_code", status)
