"""`ledgerflow projections status|rebuild` as a user runs them, against a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import psycopg
import pytest

from infrastructure.bootstrap import bootstrap
from infrastructure.postgres.schema import PostgresParams, drop_database
from infrastructure.settings import Settings
from services import commands as c

pytestmark = pytest.mark.integration


def ledgerflow(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LEDGERFLOW_DATABASE_URL": settings.database_url}
    return subprocess.run(
        [sys.executable, "-m", "ledgerflow", "-o", "json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_rebuilding_every_projection_brings_each_to_the_head(database_settings: Settings) -> None:
    app = bootstrap(database_settings)
    try:
        app.register_workflow(c.RegisterWorkflow(name="cli_orders"))
        for n in range(30):
            app.start_run(c.StartRun(workflow="cli_orders", key=f"cli-{n}"))
        head = app.recorder.max_notification_id()
    finally:
        app.close()

    rebuilt = ledgerflow(database_settings, "projections", "rebuild", "--all")
    assert rebuilt.returncode == 0, rebuilt.stderr
    body: dict[str, Any] = json.loads(rebuilt.stdout)
    assert {r["name"] for r in body["rebuilt"]} == {"runs", "workflows", "inbound_events"}
    assert all(r["position"] == head for r in body["rebuilt"])

    shown = ledgerflow(database_settings, "projections", "status")
    assert shown.returncode == 0, shown.stderr
    rows = [r for r in json.loads(shown.stdout) if r["state"] == "live"]
    assert {(r["name"], r["position"], r["lag"]) for r in rows} == {
        (name, head, 0) for name in ("runs", "workflows", "inbound_events")
    }


def test_an_unknown_projection_is_a_usage_error(database_settings: Settings) -> None:
    result = ledgerflow(database_settings, "projections", "rebuild", "nope")
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"]["code"] == "invalid_command"


def test_a_database_without_tables_says_to_run_db_init(postgres_server_url: str) -> None:
    params = PostgresParams.from_url(postgres_server_url)
    bare = Settings(database_url=params.url(f"ledgerflow_bare_{uuid.uuid4().hex[:8]}"))
    with psycopg.connect(params.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{PostgresParams.from_url(bare.database_url).dbname}"')
    try:
        result = ledgerflow(bare, "projections", "status")
        assert result.returncode == 3
        error = json.loads(result.stdout)["error"]
        assert error["code"] == "unavailable" and "no ledgerflow tables" in error["message"]
    finally:
        drop_database(bare.database_url)
