"""An optional HTTP port serving /metrics, for processes without the API (workers, roles)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from infrastructure.settings import Settings

log = logging.getLogger("ledgerflow.metrics")


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(settings: Settings) -> MetricsServer | None:
    """Serve this process's metrics on ``metrics_host:metrics_port``; None when no port."""
    if settings.metrics_port is None:
        return None
    host, port = settings.metrics_host, settings.metrics_port
    try:
        server, thread = start_http_server(port, addr=host)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise OSError(e.errno, f"cannot serve metrics on {host}:{port}: {reason}") from None
    log.info("metrics on http://%s:%d/metrics", host, port)
    return MetricsServer(server, thread)
