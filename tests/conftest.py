"""Shared fixtures: hypothesis profiles and a throw-away PostgreSQL database per session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, settings

from infrastructure.bootstrap import init_database
from infrastructure.postgres.schema import PostgresParams, drop_database
from infrastructure.settings import Settings

settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """The PostgreSQL server the tests use (``make up`` makes sure one answers)."""
    url = Settings().database_url
    params = PostgresParams.from_url(url)
    try:
        psycopg.connect(params.conninfo("postgres")).close()
    except psycopg.OperationalError as e:
        pytest.fail(
            f"PostgreSQL at {params.host}:{params.port} is unreachable ({e}); "
            "run `make up` or set LEDGERFLOW_DATABASE_URL",
            pytrace=False,
        )
    return url


@pytest.fixture(scope="session")
def database_settings(postgres_server_url: str) -> Iterator[Settings]:
    """Settings naming a fresh database, created by `db init`'s code and dropped after."""
    params = PostgresParams.from_url(postgres_server_url)
    name = f"ledgerflow_test_{uuid.uuid4().hex[:10]}"
    test_settings = Settings(database_url=params.url(name))
    init_database(test_settings)
    try:
        yield test_settings
    finally:
        drop_database(test_settings.database_url)


@pytest.fixture(
    params=["embedded", "postgres", "direct"],
    ids=["embedded", "postgres+nats", "postgres+nats+direct"],
)
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """Settings for each backend in turn: the embedded engine of ``ledgerflow dev`` (a
    SQLite file of the test's own), PostgreSQL + NATS (a database and subject prefix of
    the test's own), and the same with the SDK's direct commands (ADR 19). Scenarios that
    take it run on each, so they never drift."""
    if request.param == "embedded":
        yield Settings(database_url=f"sqlite:///{tmp_path}/ledgerflow.db")
        return
    from tests.support.isolation import isolated

    with isolated(request.getfixturevalue("postgres_server_url")) as own:
        if request.param == "direct":
            own = own.model_copy(update={"direct_commands": True})
        yield own
