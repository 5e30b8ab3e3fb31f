"""The whole service as users run it: `ledgerflow serve` (every role) in its own process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from infrastructure.bootstrap import init_database
from infrastructure.nats.streams import delete_streams
from infrastructure.postgres.schema import PostgresParams, drop_database
from infrastructure.settings import Settings
from tests.support.servers import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def service(postgres_server_url: str, tmp_path: Path) -> Iterator[tuple[Settings, httpx.Client]]:
    """`ledgerflow serve` on a fresh database, a private prefix and a free port.

    Its output goes to a file: a pipe nobody reads fills up (64 KiB of access log lines)
    and blocks the process's next log line, and with it the API."""
    params = PostgresParams.from_url(postgres_server_url)
    settings = Settings(
        database_url=params.url(f"ledgerflow_e2e_{uuid.uuid4().hex[:8]}"),
        subject_prefix=f"t{uuid.uuid4().hex[:8]}",
        api_port=free_port(),
    )
    init_database(settings)
    env = {
        **os.environ,
        **settings.as_env(),
    }
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ledgerflow", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{settings.api_port}", timeout=10)
    try:
        deadline = time.monotonic() + 30
        while not _healthy(client):
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the service never became healthy"
            time.sleep(0.1)  # still starting: poll until healthy
        yield settings, client
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        output = log_path.read_text()
        assert process.returncode == 0, output
        assert "stopped" in output
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        try:
            asyncio.run(delete_streams(settings))  # each reserves 1 GiB on nats-server
        finally:
            drop_database(settings.database_url)


def _healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


def command(client: httpx.Client, kind: str, **body: Any) -> dict[str, Any]:
    reply: dict[str, Any] = client.post(f"/commands/{kind}", json=body).json()
    assert reply["ok"], (kind, reply)
    return reply


def test_a_run_driven_over_http_reads_back_and_survives_a_rebuild_under_load(
    service: tuple[Settings, httpx.Client],
) -> None:
    settings, client = service
    command(client, "register_workflow", name="orders")
    run_ids = [
        command(client, "start_run", workflow="orders", key=f"o-{n}")["run_id"] for n in range(40)
    ]
    run = run_ids[0]
    command(client, "start_step", run_id=run, step="charge", attempt=1)
    done = command(client, "complete_step", run_id=run, step="charge", attempt=1, output={"id": 9})

    detail = client.get(f"/runs/{run}", params={"min_position": done["position"]})
    assert detail.status_code == 200
    assert detail.json()["steps"][0]["output"] == {"id": 9}
    before = client.get("/runs", params={"limit": 500}).json()["items"]

    failures: list[str] = []
    stop = threading.Event()

    def keep_reading() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=10) as reader:
            while not stop.is_set():
                for path in ("/runs", f"/runs/{run}", "/workflows"):
                    response = reader.get(path)
                    if response.status_code != 200:
                        failures.append(f"{path}: {response.status_code} {response.text}")

    readers = [threading.Thread(target=keep_reading) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        env = {**os.environ, "LEDGERFLOW_DATABASE_URL": settings.database_url}
        rebuilt = subprocess.run(
            [sys.executable, "-m", "ledgerflow", "projections", "rebuild", "--all"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert failures == []
    after = client.get("/runs", params={"limit": 500}).json()["items"]
    assert after == before
    versions = {p["name"]: p for p in client.get("/projections").json()}
    assert all(p["lag"] == 0 for p in versions.values())
