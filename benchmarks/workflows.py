"""A 3-step workflow end to end: sequential latency, and throughput with N runs in flight.

    .venv/bin/python -m benchmarks.workflows [--sequential 200] [--runs 2000] [--in-flight 50]

Every component runs in its own process on this machine: `ledgerflow serve` (commands,
relay, scheduler, projections, api) and `ledgerflow worker benchmarks.flows:flow`; the
client runs here. CPU per run adds the ledgerflow processes and this client; PostgreSQL
and nats-server are shown apart (they are shared by everything on the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path

from infrastructure.bootstrap import init_database
from infrastructure.nats.streams import delete_streams
from infrastructure.postgres.schema import PostgresParams, drop_database
from infrastructure.settings import Settings
from ledgerflow import Client
from tests.support.servers import free_port

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_by_pid(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds (user + system) each process has used so far; the gone ones left out."""
    found = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[pid] = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime, in ticks
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    return sum(cpu_by_pid(pids).values())


def pid_listening(port: int) -> int | None:
    """The process listening on TCP ``port`` of this machine (IPv4), if it can be seen."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                    return int(entry.name)
    return None


def pids_named(*names: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in names:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def wait_ready(client: Client) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            run_id = await client.start("three_steps", {"warm": True})
            await client.result(run_id, timeout=30)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)  # the service or the worker is still starting


async def sequential(client: Client, runs: int, workflow: str = "three_steps") -> list[float]:
    latencies = []
    for n in range(runs):
        started = time.perf_counter()
        run_id = await client.start(workflow, {"n": n})
        await client.result(run_id, timeout=30)
        latencies.append(time.perf_counter() - started)
    return latencies


async def in_flight(
    client: Client, runs: int, limit: int, workflow: str = "three_steps"
) -> list[float]:
    gate = asyncio.Semaphore(limit)
    latencies: list[float] = []

    async def one(n: int) -> None:
        async with gate:
            started = time.perf_counter()
            run_id = await client.start(workflow, {"n": n})
            await client.result(run_id, timeout=60)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(one(n) for n in range(runs)))
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=50)
    args = parser.parse_args()

    with running_ledgerflow(concurrency=max(args.in_flight, 1) + 14) as (settings, processes):
        results = measure_all(settings, processes, args)
    print("3-step workflow, start to result, every component on this machine:")
    for name, (latencies, rate, cpu_ms, server_ms) in results.items():
        print(
            f"  {name:<14} {rate:7.1f} runs/s   p50 {percentile(latencies, 0.5) * 1000:6.1f} ms"
            f"   p99 {percentile(latencies, 0.99) * 1000:6.1f} ms"
            f"   CPU {cpu_ms:5.1f} ms/run (ledgerflow) + {server_ms:4.1f} ms/run (postgres, nats)"
        )


@contextlib.contextmanager
def running_ledgerflow(
    concurrency: int = 10, base: Settings | None = None, serve: Sequence[Sequence[str]] = ((),)
) -> Iterator[tuple[Settings, list[subprocess.Popen[bytes]]]]:
    """`ledgerflow serve` and a worker for benchmarks.flows, on a fresh database.

    ``serve`` lists the serve processes by their roles (``()``: every role): the
    processes are those serve processes in that order, then the worker.

    The database (``bench_ledgerflow_*``) is made on the server of ``base`` (default: the
    environment's settings), and dropped at the end.
    """
    base = base or Settings()
    params = PostgresParams.from_url(base.database_url)
    settings = Settings(
        database_url=params.url(f"bench_ledgerflow_{uuid.uuid4().hex[:8]}"),
        nats_url=base.nats_url,
        subject_prefix=f"bench{uuid.uuid4().hex[:6]}",
        api_port=free_port(),
    )
    init_database(settings)
    env = {
        **os.environ,
        **settings.as_env(),
    }
    quiet = ["--log-level", "warning"]
    worker = ["worker", "benchmarks.flows:flow", "--concurrency", str(concurrency)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "ledgerflow", "serve", *_roles(roles), *quiet], env=env
        )
        for roles in serve
    ]
    processes.append(
        subprocess.Popen([sys.executable, "-m", "ledgerflow", *worker, *quiet], env=env)
    )
    try:
        yield settings, processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        try:
            # Each stream reserves its max_bytes on the shared nats-server: left behind,
            # a few dozen runs exhaust its storage and every new stream is refused.
            asyncio.run(delete_streams(settings))
        finally:
            drop_database(settings.database_url)


def _roles(roles: Sequence[str]) -> list[str]:
    return [flag for role in roles for flag in ("--role", role)]


def measure_all(
    settings: Settings, processes: list[subprocess.Popen[bytes]], args: argparse.Namespace
) -> dict[str, tuple[list[float], float, float, float]]:
    ours = [p.pid for p in processes] + [os.getpid()]
    servers = pids_named("postgres", "nats-server")

    async def measure() -> dict[str, tuple[list[float], float, float, float]]:
        results = {}
        async with await Client.connect(settings=settings) as client:
            await wait_ready(client)
            jobs: list[tuple[str, int, Callable[[], Awaitable[list[float]]]]] = [
                ("sequential", args.sequential, lambda: sequential(client, args.sequential)),
                (
                    f"{args.in_flight} in flight",
                    args.runs,
                    lambda: in_flight(client, args.runs, args.in_flight),
                ),
            ]
            for name, runs, job in jobs:
                cpu, server_cpu = cpu_seconds(ours), cpu_seconds(servers)
                started = time.perf_counter()
                latencies = await job()
                elapsed = time.perf_counter() - started
                results[name] = (
                    latencies,
                    runs / elapsed,
                    (cpu_seconds(ours) - cpu) / runs * 1000,
                    (cpu_seconds(servers) - server_cpu) / runs * 1000,
                )
        return results

    return asyncio.run(measure())


if __name__ == "__main__":
    main()
