"""Logs, traces and a metrics port for a ledgerflow process, set up from Settings."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TextIO

from infrastructure.settings import Settings
from infrastructure.telemetry.logs import configure_logging
from infrastructure.telemetry.metrics_server import start_metrics_server
from infrastructure.telemetry.tracing import configure_tracing
from ledgerflow._telemetry import TRACING

__all__ = ["configure_logging", "configure_tracing", "start_metrics_server", "telemetry"]

log = logging.getLogger("ledgerflow.telemetry")


@contextlib.contextmanager
def telemetry(
    settings: Settings, *, role: str, level: str = "info", stream: TextIO | None = None
) -> Iterator[None]:
    """A process's telemetry for as long as it runs: logging in ``settings.log_format``,
    tracing to ``settings.otel_exporter`` (off by default), and /metrics on
    ``settings.metrics_port`` (none by default). On exit, spans still buffered are sent."""
    configure_logging(level, settings.log_format, role=role, stream=stream)
    with contextlib.ExitStack() as stack:
        provider = configure_tracing(settings, role=role, set_global=True)
        if provider is not None:
            stack.callback(TRACING.disable)
            stack.callback(provider.shutdown)
        server = start_metrics_server(settings)
        if server is not None:
            stack.callback(server.close)
        yield
