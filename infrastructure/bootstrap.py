"""The composition root: build the application and its adapters from Settings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from eventsourcing.utils import get_topic

from infrastructure.postgres.read_model_schema import init_read_models
from infrastructure.postgres.recorder import CommandLoggingRecorder
from infrastructure.postgres.scheduler_schema import init_scheduler
from infrastructure.postgres.schema import PostgresParams, ensure_database
from infrastructure.settings import Settings
from infrastructure.sqlite.recorder import SQLiteCommandRecorder
from infrastructure.telemetry.stamping import StampingMapper
from services.clock import Clock
from services.workflow_runs import WorkflowRuns


def event_store_env(settings: Settings, *, create_tables: bool = False) -> dict[str, str]:
    """The eventsourcing environment for ``settings`` (never written to ``os.environ``).

    In production the tables exist already (``ledgerflow db init`` made them), so the
    library is told not to create them lazily at start-up.
    """
    mapper = get_topic(StampingMapper)  # trace context in stored events (ADR 11)
    if settings.sqlite_path is not None:
        return {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": settings.sqlite_path,
            "SQLITE_LOCK_TIMEOUT": "10",
            "CREATE_TABLE": "y",  # an embedded store makes its own tables on first use
            "APPLICATION_RECORDER_TOPIC": get_topic(SQLiteCommandRecorder),
            "MAPPER_TOPIC": mapper,
        }
    if not settings.uses_postgres:
        return {"PERSISTENCE_MODULE": "eventsourcing.popo", "MAPPER_TOPIC": mapper}
    params = PostgresParams.from_url(settings.database_url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": params.dbname,
        "POSTGRES_HOST": params.host,
        "POSTGRES_PORT": params.port,
        "POSTGRES_USER": params.user,
        "POSTGRES_PASSWORD": params.password,
        "POSTGRES_SCHEMA": settings.db_schema,
        "POSTGRES_POOL_SIZE": str(settings.db_pool_size),
        "POSTGRES_CONNECT_TIMEOUT": str(settings.db_connect_timeout),
        "POSTGRES_LOCK_TIMEOUT": "10",
        "CREATE_TABLE": "y" if create_tables else "n",
        "APPLICATION_RECORDER_TOPIC": get_topic(CommandLoggingRecorder),
        "MAPPER_TOPIC": mapper,
    }


def bootstrap(
    settings: Settings | None = None,
    *,
    clock: Clock | None = None,
    rand: Callable[[], float] | None = None,
    create_tables: bool = False,
) -> WorkflowRuns:
    """Build the WorkflowRuns service wired to the event store that ``settings`` names."""
    settings = settings or Settings()
    env = event_store_env(settings, create_tables=create_tables)
    if rand is None:
        return WorkflowRuns(env=env, clock=clock)
    return WorkflowRuns(env=env, clock=clock, rand=rand)


def init_database(settings: Settings) -> bool:
    """Create the database if missing and every table; idempotent. True if db was created."""
    if settings.sqlite_path is not None:
        path = Path(settings.sqlite_path)
        created = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        bootstrap(settings, create_tables=True).close()
        return created
    if not settings.uses_postgres:
        return False
    created = ensure_database(settings.database_url)
    app = bootstrap(settings, create_tables=True)
    app.close()
    init_read_models(settings)
    init_scheduler(settings)
    return created
