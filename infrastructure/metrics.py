"""Prometheus metrics of the service roles, at /metrics (API, or LEDGERFLOW_METRICS_PORT)."""

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
RELAY_PUBLISHED = Counter(
    "ledgerflow_relay_published_total",
    "Messages the relay had JetStream store (duplicates excluded), by kind: event or task",
    ["kind"],
)
RELAY_ACTIVE = Gauge(
    "ledgerflow_relay_active", "1 while this process's relay holds the lock and publishes"
)
PROJECTION_APPLIED = Counter(
    "ledgerflow_projection_events_applied_total",
    "Events a projection applied to its read model (each once, whichever instance)",
    ["projection"],
)

# Run-level counters: counted from the log by the projections role, as the runs projection
# applies each event exactly once (docs/observability.md), so every writer's runs count,
# and none twice across instances.
RUNS_STARTED = Counter("ledgerflow_runs_started_total", "Runs started, by workflow", ["workflow"])
RUNS_ENDED = Counter(
    "ledgerflow_runs_ended_total",
    "Runs that ended, by workflow and status: completed, failed, cancelled, timed_out",
    ["workflow", "status"],
)
RUNS_RETRIED = Counter(
    "ledgerflow_runs_retried_total", "Failed runs an operator resumed, by workflow", ["workflow"]
)
