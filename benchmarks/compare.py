"""Pure arithmetic of benchmarks.vs_dbos: per-run figures, medians, ratios, targets, tables."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SYSTEMS = ("ledgerflow", "dbos")
WORKLOADS = ("sequential", "in_flight", "twenty_steps", "burst")
REBUILD_TARGET = 30_000
"""Events/s issue 6 asks of a rebuild of every projection on 100k events."""


@dataclass(frozen=True)
class Window:
    """What was counted while one system ran one workload once."""

    runs: int
    seconds: float
    """Start of the first run to the end (the burst: to the last run completed and visible)."""
    latencies: list[float] | None
    """Seconds from start to result, per run; None for the burst (nobody waits per run)."""
    xids: int
    """Transaction ids the server handed out (write transactions), the harness's own removed."""
    wal_bytes: int
    cpu: float
    """CPU seconds of the system's own processes (ledgerflow: serve, worker, client)."""
    postgres_cpu: float
    nats_cpu: float | None
    foreign_transactions: int
    """Transactions other databases of the server committed meanwhile: noise in xids and WAL."""
    loadavg: tuple[float, float, float]
    """The 1, 5 and 15 minute load averages when the window closed."""
    cpu_by_process: dict[str, float] = field(default_factory=dict)
    """``cpu`` by process (ledgerflow: serve, worker, client)."""


@dataclass(frozen=True)
class Figures:
    """Per-run figures of one window, or medians over rounds."""

    runs_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    write_xacts_per_run: float
    wal_bytes_per_run: float
    cpu_ms_per_run: float
    postgres_cpu_ms_per_run: float
    nats_cpu_ms_per_run: float | None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The value at quantile ``q`` (nearest rank, as benchmarks.workflows has always done)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def lsn_bytes(lsn: str) -> int:
    """A PostgreSQL LSN such as ``0/419B7E0`` as a byte offset."""
    high, low = lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def figures(window: Window) -> Figures:
    runs = window.runs
    latencies = window.latencies
    return Figures(
        runs_per_s=runs / window.seconds,
        p50_ms=percentile(latencies, 0.50) * 1000 if latencies else None,
        p99_ms=percentile(latencies, 0.99) * 1000 if latencies else None,
        write_xacts_per_run=window.xids / runs,
        wal_bytes_per_run=window.wal_bytes / runs,
        cpu_ms_per_run=window.cpu / runs * 1000,
        postgres_cpu_ms_per_run=window.postgres_cpu / runs * 1000,
        nats_cpu_ms_per_run=None if window.nats_cpu is None else window.nats_cpu / runs * 1000,
    )


def median_figures(rounds: Sequence[Figures]) -> Figures:
    """Each figure's median over the rounds (a figure missing in any round stays missing)."""
    if not rounds:
        raise ValueError("no rounds")
    medians: dict[str, float | None] = {}
    for figure in fields(Figures):
        values = [getattr(f, figure.name) for f in rounds]
        medians[figure.name] = None if None in values else statistics.median(values)
    return Figures(**medians)  # type: ignore[arg-type]


def cpu_ms_per_run_by_process(windows: Sequence[Window]) -> dict[str, float]:
    """Each process's CPU ms per run, median over the rounds' windows."""
    names = sorted({name for w in windows for name in w.cpu_by_process})
    return {
        name: statistics.median(w.cpu_by_process.get(name, 0.0) / w.runs * 1000 for w in windows)
        for name in names
    }


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


@dataclass(frozen=True)
class Verdict:
    """One of issue 6's targets, and how the measurement stands against it."""

    target: str
    measured: str
    value: float | None
    goal: float
    higher_is_better: bool

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    @property
    def gap(self) -> float | None:
        """How far off: the factor the value must still improve by (1.0 when met)."""
        if self.value is None or self.value == 0:
            return None
        factor = self.goal / self.value if self.higher_is_better else self.value / self.goal
        return max(factor, 1.0)

    def line(self) -> str:
        if self.met is None:
            state = "NOT MEASURED"
        elif self.met:
            state = "met"
        else:
            state = f"MISSED: needs {self.gap:.2f}x better"
        return f"{self.target:<44} {self.measured:<34} {state}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met, "gap": self.gap}


def verdicts(
    medians: dict[str, dict[str, Figures]],
    burst_seconds: dict[str, float],
    rebuild_events_per_s: float | None,
) -> list[Verdict]:
    """Issue 6's targets against the medians (``medians[system][workload]``)."""
    ours, theirs = medians["ledgerflow"], medians["dbos"]

    def of(workload: str, pick: Callable[[Figures], float | None]) -> float | None:
        if workload not in ours or workload not in theirs:
            return None
        return ratio(pick(ours[workload]), pick(theirs[workload]))

    throughput = of("in_flight", lambda f: f.runs_per_s)
    p50 = of("sequential", lambda f: f.p50_ms)
    cpu = of("in_flight", lambda f: f.cpu_ms_per_run)
    burst = ratio(burst_seconds.get("ledgerflow"), burst_seconds.get("dbos"))
    return [
        Verdict("throughput, in flight: >= 2.0x DBOS", _x(throughput), throughput, 2.0, True),
        Verdict("sequential p50 latency: <= 0.7x DBOS", _x(p50), p50, 0.7, False),
        Verdict("CPU per run, in flight: <= 0.6x DBOS", _x(cpu), cpu, 0.6, False),
        Verdict(
            "burst: all visible before DBOS completes",
            _burst(burst_seconds),
            burst,
            1.0,
            False,
        ),
        Verdict(
            f"rebuild: >= {REBUILD_TARGET:,} events/s",
            "not run" if rebuild_events_per_s is None else f"{rebuild_events_per_s:,.0f} events/s",
            None if rebuild_events_per_s is None else rebuild_events_per_s / REBUILD_TARGET,
            1.0,
            True,
        ),
    ]


def _x(value: float | None) -> str:
    return "not measured" if value is None else f"ledgerflow/DBOS = {value:.2f}x"


def _burst(seconds: dict[str, float]) -> str:
    if "ledgerflow" not in seconds or "dbos" not in seconds:
        return "not measured"
    return f"{seconds['ledgerflow']:.1f} s vs {seconds['dbos']:.1f} s"


COLUMNS: list[tuple[str, str, str]] = [
    ("runs/s", "runs_per_s", "{:,.1f}"),
    ("p50 ms", "p50_ms", "{:,.1f}"),
    ("p99 ms", "p99_ms", "{:,.1f}"),
    ("write tx/run", "write_xacts_per_run", "{:,.2f}"),
    ("WAL B/run", "wal_bytes_per_run", "{:,.0f}"),
    ("CPU ms/run", "cpu_ms_per_run", "{:,.2f}"),
    ("PG CPU ms/run", "postgres_cpu_ms_per_run", "{:,.2f}"),
    ("NATS CPU ms/run", "nats_cpu_ms_per_run", "{:,.2f}"),
]


def _cell(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def markdown_table(medians: dict[str, dict[str, Figures]], labels: dict[str, str]) -> str:
    """One row per workload and system, then the ratio ledgerflow/DBOS of each figure."""
    head = ["workload", "system", *(c[0] for c in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for workload in WORKLOADS:
        if not all(workload in medians.get(s, {}) for s in SYSTEMS):
            continue
        rows = {s: medians[s][workload] for s in SYSTEMS}
        for system, row in rows.items():
            cells = [_cell(getattr(row, key), form) for _, key, form in COLUMNS]
            lines.append(f"| {labels[workload]} | {system} | " + " | ".join(cells) + " |")
        ratios = [
            _cell(ratio(getattr(rows["ledgerflow"], key), getattr(rows["dbos"], key)), "{:.2f}x")
            for _, key, _ in COLUMNS
        ]
        lines.append(f"| {labels[workload]} | ledgerflow/DBOS | " + " | ".join(ratios) + " |")
    return "\n".join(lines)
