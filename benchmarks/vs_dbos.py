"""ledgerflow vs DBOS Transact: the same workflows on one PostgreSQL server, rounds A/B/A/B.

    .venv/bin/python -m benchmarks.vs_dbos [--quick] [--rounds 3] [--json PATH]

Each round runs ledgerflow, then DBOS, each on a fresh database of the same server (made and
dropped here), through four workloads: (a) sequential runs of a 3-step workflow, start to
result; (b) the same with ``--in-flight`` runs at a time; (c) a 20-step workflow, as many at
a time; (d) a burst of starts, timed until every run is completed and visible (ledgerflow:
counted as completed by the read-model API; DBOS: ``SUCCESS`` in its system tables).

ledgerflow runs as two `ledgerflow serve` processes (``--serve``: commands and relay;
projections, scheduler and API), a worker, and a client process (benchmarks.drivers) that
runs a worker of its own and starts runs eagerly (ADR 17; ``--no-eager``: it does not),
and applies its commands to the store itself (ADR 19; ``--no-direct``: it sends them to
the commands role over NATS), as a DBOS application runs and records its workflows itself;
DBOS as one process (benchmarks.dbos_app). Per run: write transactions (transaction ids
the server handed out), WAL bytes, CPU of the system's own processes, and apart from those
PostgreSQL's CPU (the backends of the system's database, plus the server's background
processes) and nats-server's. The figures are medians over the
rounds; the ratios ledgerflow/DBOS are set against issue 6's targets, with a rebuild of
every projection on ``--rebuild-events`` events (benchmarks.rebuild, ledgerflow only).

The PostgreSQL server (LEDGERFLOW_DATABASE_URL's) and nats-server may be shared with other
work: each window counts the transactions other databases committed meanwhile (``foreign``),
which inflate its write transactions and WAL, and the load average when it closed.
``--private-postgres`` runs both systems on a PostgreSQL 15 of this invocation's own instead
(initdb defaults: fsync and synchronous_commit on, 128MB shared buffers), so that transaction
ids and WAL are theirs alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx
import psycopg

from benchmarks import rebuild
from benchmarks.compare import (
    SYSTEMS,
    WORKLOADS,
    Figures,
    Window,
    cpu_ms_per_run_by_process,
    figures,
    lsn_bytes,
    markdown_table,
    median_figures,
    verdicts,
)
from benchmarks.workflows import cpu_by_pid, pid_listening, running_ledgerflow
from infrastructure.postgres.schema import PostgresParams, drop_database, ensure_database
from infrastructure.settings import Settings
from tests.support.servers import PrivatePostgres

FULL = {"sequential": 500, "runs": 2000, "long_runs": 200, "burst": 5000, "rebuild": 100_000}
QUICK = {"sequential": 50, "runs": 200, "long_runs": 20, "burst": 300, "rebuild": 10_000}
POLL = 0.05
"""Seconds between two looks at the burst's completed count."""
SETTLE_TIMEOUT = 120.0
"""Seconds ledgerflow's projections get to catch up at the end of a window."""


class BenchPostgres(PrivatePostgres):
    """A private server with PostgreSQL's default sizes (the test servers are made smaller)."""

    def _initialise(self) -> None:
        super()._initialise()
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("shared_buffers = '128MB'\nmax_connections = 100\n")  # last one wins


@contextlib.contextmanager
def postgres_server(private: bool) -> Iterator[Settings]:
    """Settings naming the server to use: the environment's, or a private one."""
    if not private:
        yield Settings()
        return
    with tempfile.TemporaryDirectory(prefix="bench-pg-") as work, BenchPostgres(Path(work)) as pg:
        yield Settings(database_url=pg.url)


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


@dataclass(frozen=True)
class Sample:
    at: float
    xid: int
    wal: int
    foreign: int
    own_cpu: dict[str, float]
    postgres_cpu: dict[int, float]
    nats_cpu: float | None


class Meter:
    """Samples what a system costs the server and the machine; two samples make a Window.

    Its connection goes to the system's database and runs read-only statements only, so it
    takes no transaction id: ``pg_snapshot_xmax(pg_current_snapshot())`` (the next id to be
    handed out) does not take one either. Its own backend is left out of PostgreSQL's CPU.
    """

    def __init__(self, database_url: str, own: dict[str, int], nats_pid: int | None) -> None:
        self.conn = psycopg.connect(
            PostgresParams.from_url(database_url).conninfo(), autocommit=True
        )
        self.own = own
        self.nats_pid = nats_pid

    def close(self) -> None:
        self.conn.close()

    def sample(self) -> Sample:
        row = self.conn.execute(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text, pg_current_wal_lsn()::text,"
            " (SELECT coalesce(sum(xact_commit + xact_rollback), 0) FROM pg_stat_database"
            "   WHERE datname IS DISTINCT FROM current_database())::bigint,"
            " ARRAY(SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
            "   AND (datname = current_database()"
            "        OR (datname IS NULL AND backend_type <> 'client backend')))"
        ).fetchone()
        assert row is not None
        xid, lsn, foreign, pids = row
        nats = None if self.nats_pid is None else sum(cpu_by_pid([self.nats_pid]).values())
        return Sample(
            at=time.perf_counter(),
            xid=int(xid),
            wal=lsn_bytes(lsn),
            foreign=int(foreign),
            own_cpu={name: cpu_by_pid([pid]).get(pid, 0.0) for name, pid in self.own.items()},
            postgres_cpu=cpu_by_pid(pids),
            nats_cpu=nats,
        )

    def completed_dbos_runs(self) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM dbos.workflow_status WHERE status = 'SUCCESS'"
        ).fetchone()
        return int(row[0]) if row else 0


def window(
    before: Sample, after: Sample, runs: int, seconds: float, latencies: list[float] | None
) -> Window:
    # A backend born during the window counts from zero; one that ended in it is lost.
    postgres = sum(
        cpu - before.postgres_cpu.get(pid, 0.0) for pid, cpu in after.postgres_cpu.items()
    )
    nats = None
    if before.nats_cpu is not None and after.nats_cpu is not None:
        nats = after.nats_cpu - before.nats_cpu
    return Window(
        runs=runs,
        seconds=seconds,
        latencies=latencies,
        xids=after.xid - before.xid,  # the Meter takes none itself
        wal_bytes=after.wal - before.wal,
        cpu=sum(after.own_cpu.values()) - sum(before.own_cpu.values()),
        postgres_cpu=postgres,
        nats_cpu=nats,
        foreign_transactions=after.foreign - before.foreign,
        loadavg=loadavg(),
        cpu_by_process={n: cpu - before.own_cpu.get(n, 0.0) for n, cpu in after.own_cpu.items()},
    )


class Driver:
    """A system's client process (benchmarks.drivers' protocol): one request, one reply."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.hello = self._read()
        if not self.hello.get("ready"):
            raise RuntimeError(f"{command}: not ready: {self.hello}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def request(self, **body: Any) -> dict[str, Any]:
        stdin = self._pipe(self.process.stdin)
        stdin.write(json.dumps(body) + "\n")
        stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        line = self._pipe(self.process.stdout).readline()
        if not line:
            raise RuntimeError(f"driver {self.process.args!r} ended (exit {self.process.wait()})")
        message: dict[str, Any] = json.loads(line)
        return message

    @staticmethod
    def _pipe(pipe: IO[str] | None) -> IO[str]:
        assert pipe is not None
        return pipe

    def close(self) -> None:
        self._pipe(self.process.stdin).close()  # end of requests: the driver stops
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Harness:
    """One system, running, with what the workloads need to drive and to measure it."""

    name: str
    driver: Driver
    meter: Meter
    completed: Callable[[], int]
    """How many three-step runs are completed (and, for ledgerflow, visible)."""
    settle: Callable[[], None]
    """Wait until the work the runs caused is done (ledgerflow: projections caught up)."""
    processes: dict[str, int]
    """The system's own processes, by role."""


@contextlib.contextmanager
def ledgerflow_harness(
    base: Settings,
    concurrency: int,
    serve: Sequence[Sequence[str]] = ((),),
    eager: bool = True,
    direct: bool = True,
) -> Iterator[Harness]:
    with running_ledgerflow(concurrency=concurrency, base=base, serve=serve) as (
        settings,
        processes,
    ):
        env = {
            **os.environ,
            "LEDGERFLOW_DATABASE_URL": settings.database_url,
            "LEDGERFLOW_NATS_URL": settings.nats_url,
            "LEDGERFLOW_SUBJECT_PREFIX": settings.subject_prefix,
            "BENCH_EAGER_CONCURRENCY": str(concurrency if eager else 0),
            "LEDGERFLOW_DIRECT_COMMANDS": str(direct).lower(),
        }
        driver = Driver([sys.executable, "-m", "benchmarks.drivers"], env)
        api = httpx.Client(base_url=f"http://127.0.0.1:{settings.api_port}", timeout=30)
        serving = {
            "serve" if len(serve) == 1 else "serve-" + "+".join(roles): process.pid
            for roles, process in zip(serve, processes, strict=False)
        }
        roles = {**serving, "worker": processes[-1].pid, "client": driver.pid}
        meter = Meter(settings.database_url, roles, nats_pid(settings.nats_url))

        def completed() -> int:
            for workflow in api.get("/workflows").raise_for_status().json():
                if workflow["name"] == "three_steps":
                    return int(workflow["runs"].get("completed", 0))
            return 0

        def settle() -> None:
            deadline = time.monotonic() + SETTLE_TIMEOUT
            while any(p["lag"] for p in api.get("/projections").raise_for_status().json()):
                if time.monotonic() > deadline:
                    raise TimeoutError("ledgerflow's projections did not catch up")
                time.sleep(POLL)

        try:
            yield Harness("ledgerflow", driver, meter, completed, settle, roles)
        finally:
            meter.close()
            api.close()
            driver.close()


@contextlib.contextmanager
def dbos_harness(base: Settings) -> Iterator[Harness]:
    params = PostgresParams.from_url(base.database_url)
    url = params.url(f"bench_dbos_{uuid.uuid4().hex[:8]}")
    ensure_database(url)
    try:
        driver = Driver([sys.executable, "-m", "benchmarks.dbos_app", "--database-url", url])
        meter = Meter(url, {"dbos": driver.pid}, nats_pid(base.nats_url))
        try:
            yield Harness(
                "dbos", driver, meter, meter.completed_dbos_runs, lambda: None, {"dbos": driver.pid}
            )
        finally:
            meter.close()
            driver.close()
    finally:
        drop_database(url)


def nats_pid(url: str) -> int | None:
    return pid_listening(urlsplit(url).port or 4222)


@contextlib.contextmanager
def profiling(directory: Path | None, label: str, pids: dict[str, int]) -> Iterator[None]:
    """py-spy records each process while the block runs: raw collapsed stacks of the threads
    holding the GIL (Python at work; a thread waiting on a socket or a lock has let it go)."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    spies = [
        subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                *(
                    "record",
                    "--pid",
                    str(pid),
                    "--format",
                    "raw",
                    "--nolineno",
                    "--nonblocking",
                    "--gil",
                ),
                *("--output", str(directory / f"{label}-{role}.txt")),
            ],
            stdout=subprocess.DEVNULL,
        )
        for role, pid in pids.items()
    ]
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file when interrupted
        for spy in spies:
            spy.wait(timeout=60)


def run_workloads(
    harness: Harness, sizes: argparse.Namespace, profile: Path | None
) -> dict[str, Window]:
    windows: dict[str, Window] = {}
    jobs = [
        ("sequential", "three", sizes.sequential, 1),
        ("in_flight", "three", sizes.runs, sizes.in_flight),
        ("twenty_steps", "twenty", sizes.long_runs, sizes.in_flight),
    ]
    for workload, workflow, runs, in_flight in jobs:
        if workload not in sizes.workloads or runs <= 0:
            continue
        with profiling(profile, f"{harness.name}-{workload}", harness.processes):
            before = harness.meter.sample()
            reply = harness.driver.request(
                op="runs", workflow=workflow, runs=runs, in_flight=in_flight
            )
            harness.settle()
            after = harness.meter.sample()
        windows[workload] = window(before, after, runs, reply["seconds"], reply["latencies"])
        report(harness.name, workload, windows[workload])
    if "burst" in sizes.workloads and sizes.burst > 0:
        windows["burst"] = burst(harness, sizes.burst, sizes.in_flight)
        report(harness.name, "burst", windows["burst"])
    return windows


def burst(harness: Harness, runs: int, in_flight: int) -> Window:
    """Start ``runs`` runs at once; time until every one is completed (and visible)."""
    target = harness.completed() + runs
    before = harness.meter.sample()
    started = time.perf_counter()
    accepted = harness.driver.request(op="burst", runs=runs, in_flight=in_flight)["seconds"]
    deadline = started + max(300.0, runs / 5)
    while harness.completed() < target:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{harness.name}: the burst did not complete")
        time.sleep(POLL)
    seconds = time.perf_counter() - started
    harness.settle()
    after = harness.meter.sample()
    print(f"    ({harness.name} accepted the {runs} starts in {accepted:.1f} s)", flush=True)
    return window(before, after, runs, seconds, None)


def report(system: str, workload: str, w: Window) -> None:
    f = figures(w)
    by_process = ", ".join(f"{n} {c / w.runs * 1000:.1f}" for n, c in w.cpu_by_process.items())
    p50 = "" if f.p50_ms is None else f"  p50 {f.p50_ms:.1f} ms  p99 {f.p99_ms:.1f} ms"
    print(
        f"  {system:<10} {workload:<13} {f.runs_per_s:8.1f} runs/s{p50}"
        f"  {f.write_xacts_per_run:.2f} tx/run  {f.cpu_ms_per_run:.2f} CPU ms/run ({by_process})"
        f"  (foreign tx {w.foreign_transactions}, load {w.loadavg[0]:.2f})",
        flush=True,
    )


TWO_PROCESSES = "commands,relay/projections,scheduler,api"
"""The roles on two processes, as docs/operations.md deploys them on two hosts: the command
path (commands, relay) off the GIL of the followers (projections, scheduler) and the API."""


def serve_groups(text: str) -> list[tuple[str, ...]]:
    """``--serve``'s value: one tuple of roles per serve process (``()``: every role)."""
    return [tuple(r for r in group.split(",") if r) for group in text.split("/")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: about a minute")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sequential", type=int, help="(a) sequential runs [500; quick 50]")
    parser.add_argument("--runs", type=int, help="(b) runs with --in-flight [2000; quick 200]")
    parser.add_argument("--in-flight", type=int, default=50, help="runs at a time in (b)-(d)")
    parser.add_argument("--long-runs", type=int, help="(c) 20-step runs [200; quick 20]")
    parser.add_argument("--burst", type=int, help="(d) starts in the burst [5000; quick 300]")
    parser.add_argument(
        "--rebuild-events", type=int, help="rebuild on this many events, 0: skip [100000; 10000]"
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="e.g. ledgerflow")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="e.g. in_flight")
    parser.add_argument(
        "--profile", type=Path, help="py-spy each process during (a)-(c) into this directory"
    )
    parser.add_argument(
        "--private-postgres", action="store_true", help="a PostgreSQL server of this run's own"
    )
    parser.add_argument(
        "--serve",
        default=TWO_PROCESSES,
        help="ledgerflow's serve processes by their roles, one process per '/'-separated "
        f"group; '' is one process with every role [{TWO_PROCESSES}]",
    )
    parser.add_argument(
        "--eager",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ledgerflow's client process runs a worker too and starts runs eagerly (ADR 17), "
        "as DBOS runs workflows in the process that starts them [on]",
    )
    parser.add_argument(
        "--direct",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ledgerflow's client process applies its commands to the event store itself "
        "(ADR 19), as DBOS writes to its database from the process that runs workflows [on]",
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/vs_dbos.json"))
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for name in ("sequential", "runs", "long_runs", "burst"):
        if getattr(args, name) is None:
            setattr(args, name, sizes[name])
    if args.rebuild_events is None:
        args.rebuild_events = sizes["rebuild"]
    args.serve = serve_groups(args.serve)
    args.systems = [s for s in args.systems.split(",") if s]
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(args.systems) - set(SYSTEMS) | set(args.workloads) - set(WORKLOADS)
    if unknown or args.rounds < 1:
        parser.error(f"unknown systems or workloads {sorted(unknown)}, or no round")
    return args


LABELS = {
    "sequential": "(a) sequential",
    "in_flight": "(b) {n} in flight",
    "twenty_steps": "(c) 20 steps, {n} in flight",
    "burst": "(d) burst",
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with postgres_server(args.private_postgres) as base:
        compare(args, base)


def compare(args: argparse.Namespace, base: Settings) -> None:
    started_at, load_at_start = datetime.now(UTC), loadavg()
    rounds: list[dict[str, dict[str, Window]]] = []
    hello: dict[str, Any] = {}
    for n in range(args.rounds):
        print(f"round {n + 1} of {args.rounds} (load {loadavg()[0]:.2f})", flush=True)
        this_round: dict[str, dict[str, Window]] = {}
        for system in args.systems:
            profile = args.profile / f"round{n + 1}" if args.profile else None
            harness: contextlib.AbstractContextManager[Harness] = (
                ledgerflow_harness(
                    base,
                    concurrency=args.in_flight + 14,
                    serve=args.serve,
                    eager=args.eager,
                    direct=args.direct,
                )
                if system == "ledgerflow"
                else dbos_harness(base)
            )
            with harness as running:
                hello[system] = running.driver.hello
                this_round[system] = run_workloads(running, args, profile)
        rounds.append(this_round)

    medians = {
        system: {
            workload: median_figures([figures(r[system][workload]) for r in rounds])
            for workload in rounds[0].get(system, {})
        }
        for system in args.systems
    }
    burst_seconds = {
        s: statistics.median([r[s]["burst"].seconds for r in rounds])
        for s in args.systems
        if "burst" in rounds[0].get(s, {})
    }
    rebuilt: dict[str, Any] | None = None
    if args.rebuild_events > 0:
        head, timings = rebuild.measure(args.rebuild_events, base)
        rebuilt = {"events": head, "seconds": timings}
    rebuild_rate = rebuilt["events"] / rebuilt["seconds"]["all"] if rebuilt else None
    results = {
        "date": started_at.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": load_at_start,
            "loadavg_end": loadavg(),
            "python": platform.python_version(),
        },
        "versions": {
            "dbos": version("dbos") if "dbos" in args.systems else None,
            "eventsourcing": version("eventsourcing"),
            "postgres": server_version(base),
        },
        "postgres_server": "private" if args.private_postgres else "shared",
        "ledgerflow": {
            "serve": ["/".join(r) for r in args.serve],
            "eager": args.eager,
            "direct": args.direct,
        },
        "sizes": {
            k: getattr(args, k)
            for k in ("rounds", "sequential", "runs", "in_flight", "long_runs", "burst")
        },
        "rounds": [
            {s: {w: _window_json(win) for w, win in r[s].items()} for s in r} for r in rounds
        ],
        "medians": {s: {w: f.as_dict() for w, f in m.items()} for s, m in medians.items()},
        "burst_seconds": burst_seconds,
        "cpu_ms_per_run_by_process": {
            s: {
                w: cpu_ms_per_run_by_process([r[s][w] for r in rounds])
                for w in rounds[0].get(s, {})
            }
            for s in args.systems
        },
        "rebuild": rebuilt,
    }
    print_summary(args, results, medians, burst_seconds, rebuild_rate)
    if set(SYSTEMS) <= set(args.systems):
        results["verdicts"] = [v.as_dict() for v in verdicts(medians, burst_seconds, rebuild_rate)]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.json}")


def print_summary(
    args: argparse.Namespace,
    results: dict[str, Any],
    medians: dict[str, dict[str, Figures]],
    burst_seconds: dict[str, float],
    rebuild_rate: float | None,
) -> None:
    labels = {w: label.format(n=args.in_flight) for w, label in LABELS.items()}
    machine = results["machine"]
    print()
    print(
        f"ledgerflow vs DBOS {results['versions']['dbos']}, {results['date']},"
        f" {results['postgres_server']} PostgreSQL {results['versions']['postgres']},"
        f" medians of {args.rounds} rounds; load average {machine['loadavg_start'][0]:.2f}"
        f" at the start, {machine['loadavg_end'][0]:.2f} at the end:"
    )
    if set(SYSTEMS) <= set(args.systems):
        print(markdown_table(medians, labels))
        print()
        for verdict in verdicts(medians, burst_seconds, rebuild_rate):
            print(verdict.line())
    else:
        for system, by_workload in medians.items():
            for workload, f in by_workload.items():
                print(f"  {system} {labels[workload]}: {f.as_dict()}")
    print("CPU ms per run by process (medians):")
    for system, by_workload in results["cpu_ms_per_run_by_process"].items():
        for workload, by_process in by_workload.items():
            shares = ", ".join(f"{name} {ms:.2f}" for name, ms in by_process.items())
            print(f"  {system:<10} {labels[workload]:<28} {shares}")
    rebuilt = results["rebuild"]
    if rebuilt:
        per = ", ".join(
            f"{name} {rebuilt['events'] / s:,.0f}/s" for name, s in rebuilt["seconds"].items()
        )
        print(f"rebuild of {rebuilt['events']:,} events: {per}")


def server_version(base: Settings) -> str:
    conninfo = PostgresParams.from_url(base.database_url).conninfo("postgres")
    with psycopg.connect(conninfo) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def _window_json(w: Window) -> dict[str, Any]:
    data = asdict(w)
    latencies = data.pop("latencies")
    data["latency_count"] = None if latencies is None else len(latencies)
    data["figures"] = figures(w).as_dict()
    return data


if __name__ == "__main__":
    main()
