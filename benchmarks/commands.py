"""start_run throughput over NATS with N requests in flight, and transactions per command.

    .venv/bin/python -m benchmarks.commands [--runs 5000] [--in-flight 100]

Starts `ledgerflow serve --role commands` as its own process on a fresh database and a
private subject prefix, then sends requests from this process over loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import nats
import psycopg

from infrastructure.bootstrap import init_database
from infrastructure.nats.names import Names
from infrastructure.postgres.schema import PostgresParams, drop_database
from infrastructure.settings import Settings

TARGET_COMMANDS_PER_SECOND = 3000


def transactions(settings: Settings) -> int:
    time.sleep(1.5)  # backends flush their statistics about once a second
    params = PostgresParams.from_url(settings.database_url)
    with psycopg.connect(params.conninfo("postgres")) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (params.dbname,)
        ).fetchone()
    return int(row[0]) if row else 0


async def send_all(url: str, names: Names, runs: int, in_flight: int, keyed: bool) -> list[float]:
    latencies: list[float] = []
    gate = asyncio.Semaphore(in_flight)
    async with await nats.connect(url) as nc:
        subject = names.command("start_run")

        async def one(n: int) -> None:
            body = {"workflow": "bench", "input": {"n": n}}
            if keyed:
                body["key"] = f"k-{n}"
            async with gate:
                started = time.perf_counter()
                reply = json.loads((await nc.request(subject, json.dumps(body).encode(), 30)).data)
                latencies.append(time.perf_counter() - started)
            assert reply["ok"], reply

        await one(-1)  # warm the service up
        latencies.clear()
        await asyncio.gather(*(one(n) for n in range(runs)))
    return latencies


async def wait_until_serving(url: str, names: Names) -> None:
    async with await nats.connect(url) as nc:
        deadline = time.monotonic() + 30
        while True:
            try:
                body = json.dumps({"name": "bench"}).encode()
                await nc.request(names.command("register_workflow"), body, timeout=2)
                return
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--keyed", action="store_true", help="give each start a key")
    args = parser.parse_args()

    base = Settings()
    params = PostgresParams.from_url(base.database_url)
    settings = Settings(database_url=params.url(f"bench_commands_{uuid.uuid4().hex[:8]}"))
    names = Names(f"bench{uuid.uuid4().hex[:6]}")
    init_database(settings)
    env = {
        **os.environ,
        "LEDGERFLOW_DATABASE_URL": settings.database_url,
        "LEDGERFLOW_SUBJECT_PREFIX": names.prefix,
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ledgerflow",
            "serve",
            "--role",
            "commands",
            "--log-level",
            "warning",
        ],
        env=env,
    )
    try:
        asyncio.run(wait_until_serving(settings.nats_url, names))
        before = transactions(settings)
        started = time.perf_counter()
        latencies = asyncio.run(
            send_all(settings.nats_url, names, args.runs, args.in_flight, args.keyed)
        )
        elapsed = time.perf_counter() - started
        after = transactions(settings)
    finally:
        server.terminate()
        server.wait(timeout=30)
        drop_database(settings.database_url)

    rate = args.runs / elapsed
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    print(f"start_run over NATS: {args.runs} runs, {args.in_flight} in flight, keyed={args.keyed}")
    print(f"  throughput        {rate:,.0f} commands/s")
    print(f"  latency           p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    print(f"  transactions      {(after - before) / args.runs:.3f} per command (all, incl. reads)")
    print(f"  vs target         {rate / TARGET_COMMANDS_PER_SECOND:.2f}x of 3,000 commands/s")


if __name__ == "__main__":
    main()
