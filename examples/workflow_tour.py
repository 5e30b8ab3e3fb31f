"""The product in one run: a Python workflow, a worker, the service, and its history.

Starts `ledgerflow serve` (every role) and `ledgerflow worker examples.orders:flow`, then,
as a client: starts two orders, confirms one (the other ships to nowhere and is
compensated), waits for their results, and shows what the HTTP API and the event store
say about them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import nats
import nats.js.errors
from rich.console import Console

from infrastructure.bootstrap import init_database
from infrastructure.nats.names import Names
from infrastructure.postgres.schema import PostgresParams, drop_database
from infrastructure.settings import Settings
from ledgerflow import Client, RunFailedError

console = Console()


async def tour(settings: Settings, http: httpx.Client) -> None:
    async with await Client.connect(settings=settings) as client:
        good = f"order-{uuid.uuid4().hex[:6]}"
        good_run = await client.start(
            "fulfil_order", {"order_id": good, "amount_cents": 1999, "items": ["mug"]}, key=good
        )
        bad_run = await client.start(
            "fulfil_order",
            {"order_id": f"{good}-b", "amount_cents": 500, "items": ["pen"], "address": "nowhere"},
        )
        console.print(f"started {good_run} and {bad_run}")
        deadline = time.monotonic() + 30
        while "confirmation" not in (await client.get(str(good_run)))["waits"]:
            if time.monotonic() > deadline:
                raise SystemExit("the order never got to its confirmation wait")
            await asyncio.sleep(0.05)  # the worker is running its first steps
        await client.send_event("order.confirmed", {"order_id": good, "by": "the customer"})
        receipt = await client.result(str(good_run), timeout=30)
        console.print(f"[green]completed[/]: {receipt}")
        try:
            await client.result(str(bad_run), timeout=30)
        except RunFailedError as failure:
            console.print(f"[red]failed[/] (compensated): {failure}")
        for run_id in (good_run, bad_run):
            show(http, str(run_id))


def show(http: httpx.Client, run_id: str) -> None:
    # The history is read from the store; the run's row from a read model, which follows
    # the store a few milliseconds behind: min_position waits until it has caught up.
    history = http.get(f"/runs/{run_id}/history").json()["events"]
    last = max(e["position"] for e in history)
    detail = http.get(f"/runs/{run_id}", params={"min_position": last}).json()
    steps = ", ".join(f"{s['name']} {s['status']}" for s in detail["steps"])
    console.print(f"GET /runs/{run_id}?min_position={last}: {detail['status']} ({steps})")
    console.print("  history: " + " → ".join(e["type"] for e in history))


def fresh_settings() -> Settings:
    """A database and subject prefix of the tour's own, made anew on every run.

    The prefix's streams go with the database: a stream that remembers positions the new
    store has not reached yet would make the relay wait for them.
    """
    params = PostgresParams.from_url(Settings().database_url)
    settings = Settings(database_url=params.url("ledgerflow_tour"), subject_prefix="tour")
    drop_database(settings.database_url)
    asyncio.run(delete_streams(settings))
    init_database(settings)
    return settings


async def delete_streams(settings: Settings) -> None:
    names = Names(settings.subject_prefix)
    async with await nats.connect(settings.nats_url) as nc:
        js = nc.jetstream()
        for stream in (names.events_stream, names.tasks_stream):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream)


def main() -> None:
    settings = fresh_settings()
    base = f"http://{settings.api_host}:{settings.api_port}"
    quiet = ["--log-level", "warning"]
    env = {
        **os.environ,
        "LEDGERFLOW_DATABASE_URL": settings.database_url,
        "LEDGERFLOW_SUBJECT_PREFIX": settings.subject_prefix,
    }
    # The worker first in the list: it is stopped first, while the service still answers.
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "ledgerflow", "worker", "examples.orders:flow", *quiet],
            env=env,
        ),
        subprocess.Popen([sys.executable, "-m", "ledgerflow", "serve", *quiet], env=env),
    ]
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                    raise SystemExit(f"ledgerflow did not come up at {base}")
                time.sleep(0.1)  # still starting
            while not any(w["name"] == "fulfil_order" for w in http.get("/workflows").json()):
                if time.monotonic() > deadline:
                    raise SystemExit("the worker never registered its workflows")
                time.sleep(0.1)  # the worker registers as soon as the service answers
            console.print(f"ledgerflow is up: API {base}, NATS {settings.nats_url}, a worker")
            asyncio.run(tour(settings, http))
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    console.print("[green]ok[/]: stopped the service and the worker (SIGTERM)")


if __name__ == "__main__":
    main()
