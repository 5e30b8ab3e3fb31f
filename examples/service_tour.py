"""A tour of the running service: commands over NATS, reads over HTTP, history from the store.

Starts `ledgerflow serve` (every role) on the configured PostgreSQL and NATS, drives an
order run the way a worker will, then reads it back through the HTTP API with
read-your-writes (`min_position`) and prints its event history. The SDK and workers that
send these commands for you come with the next issue.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx
import nats
from nats.aio.client import Client as NatsClient
from rich.console import Console
from rich.table import Table

from infrastructure.nats.names import Names
from infrastructure.nats.requests import request
from infrastructure.settings import Settings

console = Console()


class Commands:
    """Sends commands over NATS request/reply, as a client or worker does."""

    def __init__(self, nc: NatsClient, names: Names) -> None:
        self.nc, self.names = nc, names

    async def __call__(self, kind: str, **body: Any) -> dict[str, Any]:
        reply = await request(self.nc, self.names.command(kind), json.dumps(body).encode(), 10)
        answer: dict[str, Any] = json.loads(reply.data)
        if not answer["ok"]:
            raise RuntimeError(f"{kind}: {answer['error']}")
        return answer


async def drive_an_order(send: Commands, order: str) -> tuple[str, int]:
    await send("register_workflow", name="fulfil_order", triggers=["order.placed"])
    run = (await send("start_run", workflow="fulfil_order", input={"order": order}, key=order))[
        "run_id"
    ]
    await send("start_step", run_id=run, step="charge", attempt=1)
    timeout = {"type": "GatewayTimeout", "message": "the card gateway did not answer"}
    await send("fail_step", run_id=run, step="charge", attempt=1, error=timeout)
    await send("start_step", run_id=run, step="charge", attempt=2)
    charge = {"charge_id": "ch_42", "amount": 1999}
    await send("complete_step", run_id=run, step="charge", attempt=2, output=charge)
    await send("start_sleep", run_id=run, name="cool-off", seconds=600)
    await send("fire_timer", run_id=run, name="cool-off")
    await send(
        "start_wait",
        run_id=run,
        name="shipped",
        event_name="shipment.confirmed",
        match={"order": order},
    )
    event = await send("send_event", name="shipment.confirmed", data={"order": order})
    await send("deliver_event", run_id=run, name="shipped", event_id=event["event_id"])
    done = await send("complete_run", run_id=run, output={"charge": charge})
    return run, done["position"]


def show(http: httpx.Client, run: str, position: int) -> None:
    detail = http.get(f"/runs/{run}", params={"min_position": position}).json()
    table = Table(title=f"GET /runs/{run}  →  {detail['status']}", title_justify="left")
    for column in ("step", "status", "attempts", "output"):
        table.add_column(column)
    for step in detail["steps"]:
        table.add_row(
            step["name"], step["status"], str(step["attempts"]), json.dumps(step["output"])
        )
    console.print(table)
    history = http.get(f"/runs/{run}/history").json()["events"]
    console.print("GET /runs/{id}/history (from the event store):")
    for event in history:
        console.print(f"  {event['position']:>6}  v{event['version']:<3} {event['type']}")
    lags = {p["name"]: p["lag"] for p in http.get("/projections").json()}
    console.print(f"GET /projections: lag {lags}")


def main() -> None:
    settings = Settings()
    names = Names(settings.subject_prefix)
    service = subprocess.Popen(
        [sys.executable, "-m", "ledgerflow", "serve", "--log-level", "warning"], env=os.environ
    )
    base = f"http://{settings.api_host}:{settings.api_port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if service.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"ledgerflow serve did not come up at {base}")
                time.sleep(0.1)  # still starting
            console.print(f"[green]ledgerflow serve[/] is up: API {base}, NATS {settings.nats_url}")

            async def drive() -> tuple[str, int]:
                async with await nats.connect(settings.nats_url) as nc:
                    return await drive_an_order(
                        Commands(nc, names), f"order-{uuid.uuid4().hex[:6]}"
                    )

            run, position = asyncio.run(drive())
            show(http, run, position)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)
    console.print("[green]ok[/]: stopped the service (SIGTERM); `make serve` keeps one running")


if __name__ == "__main__":
    main()
