"""Prometheus metrics of every role, served by the API at /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

COMMANDS = Counter(
    "ledgerflow_commands_total", "Commands answered, by name and outcome", ["name", "outcome"]
)
COMMAND_SECONDS = Histogram(
    "ledgerflow_command_seconds",
    "Seconds from a command's arrival to its reply",
    ["name"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
COMMAND_BATCH_SIZE = Histogram(
    "ledgerflow_command_batch_size",
    "Commands applied per database transaction (group commit)",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)
EVENTS_APPENDED = Counter("ledgerflow_events_appended_total", "Events appended by this process")
STORE_HEAD = Gauge("ledgerflow_store_head_position", "Global position of the newest stored event")
RELAY_LAG = Gauge("ledgerflow_relay_lag_events", "Store head minus the last published position")
PROJECTION_LAG = Gauge(
    "ledgerflow_projection_lag_events", "Store head minus a projection's position", ["projection"]
)
