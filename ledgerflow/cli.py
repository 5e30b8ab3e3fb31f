"""The ``ledgerflow`` command line (Typer + Rich); ``-o json`` for scripts."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from ledgerflow import __version__

if TYPE_CHECKING:
    from infrastructure.settings import Settings

T = TypeVar("T")


class Output(StrEnum):
    TABLE = "table"
    JSON = "json"


class Exit(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNAVAILABLE = 3


app = typer.Typer(
    name="ledgerflow",
    help="Durable workflows for Python on an event-sourced core.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Manage the event-store database.", no_args_is_help=True)
app.add_typer(db_app, name="db")
projections_app = typer.Typer(help="Read models: lag, and rebuilds.", no_args_is_help=True)
app.add_typer(projections_app, name="projections")

console = Console()
err_console = Console(stderr=True)


class State:
    output: Output = Output.TABLE
    database_url: str | None = None


state = State()


@app.callback()
def _global(
    output: Annotated[
        Output, typer.Option("--output", "-o", help="table for humans, json for scripts")
    ] = Output.TABLE,
    database_url: Annotated[
        str | None,
        typer.Option(help="PostgreSQL URL (default: $LEDGERFLOW_DATABASE_URL)", show_default=False),
    ] = None,
) -> None:
    state.output = output
    state.database_url = database_url


def _emit(data: dict[str, Any], human: str) -> None:
    if state.output is Output.JSON:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        console.print(human)


def _fail(code: str, message: str, exit_code: Exit, hint: str | None = None) -> None:
    if state.output is Output.JSON:
        body = {"ok": False, "error": {"code": code, "message": message, "details": []}}
        sys.stdout.write(json.dumps(body) + "\n")
    else:
        err_console.print(f"[bold red]error[/]: {message}")
        if hint:
            err_console.print(hint)
    raise typer.Exit(int(exit_code))


@app.command()
def version() -> None:
    """Print the ledgerflow version."""
    _emit({"version": __version__}, f"ledgerflow {__version__}")


@db_app.command("init")
def db_init() -> None:
    """Create the database if missing, then the event-store tables (idempotent)."""
    import psycopg

    from infrastructure.bootstrap import init_database
    from infrastructure.postgres.schema import PostgresParams

    settings = _settings()
    if not settings.uses_postgres:
        _emit({"ok": True, "created": False}, "in-memory store: nothing to initialise")
        return
    params = PostgresParams.from_url(settings.database_url)
    where = f"{params.host}:{params.port}"
    try:
        created = init_database(settings)
    except psycopg.OperationalError as e:
        _fail(
            "unavailable",
            f"cannot reach PostgreSQL at {where}: {str(e).strip().splitlines()[0]}",
            Exit.UNAVAILABLE,
            hint="start it with `make up`, or set LEDGERFLOW_DATABASE_URL",
        )
        return
    verb = "created" if created else "found"
    _emit(
        {"ok": True, "database": params.dbname, "created": created},
        f"database [bold]{params.dbname}[/] {verb} at {where}; tables ready",
    )


@projections_app.command("status")
def projections_status() -> None:
    """Every projection's position, the store's head, and the lag between them."""
    from rich.table import Table

    from infrastructure.postgres.read_models import status

    rows = _with_database(status)
    if state.output is Output.JSON:
        sys.stdout.write(json.dumps([vars(row) for row in rows]) + "\n")
        return
    table = Table("projection", "version", "position", "head", "lag", "state")
    for row in rows:
        lag = f"[green]{row.lag}[/]" if row.lag == 0 else f"[yellow]{row.lag}[/]"
        table.add_row(row.name, str(row.version), str(row.position), str(row.head), lag, row.state)
    console.print(table)


@projections_app.command("rebuild")
def projections_rebuild(
    name: Annotated[str | None, typer.Argument(help="runs, workflows or inbound_events")] = None,
    every: Annotated[bool, typer.Option("--all", help="rebuild every projection")] = False,
) -> None:
    """Build a projection anew from the event store beside the live one, then swap it in."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from infrastructure.postgres.read_models import RebuildInProgressError, rebuild
    from projections.catalog import UnknownProjectionError, projection_names

    if (name is None) == (not every):
        _fail("invalid_command", "name one projection, or give --all", Exit.USAGE)
    try:
        names = projection_names(None if every else name)
    except UnknownProjectionError as e:
        _fail("invalid_command", str(e), Exit.USAGE)
        return
    with Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8,.0f} events/s  {task.fields[left]:>9,} remaining"),
        console=err_console,
        disable=state.output is Output.JSON,
    ) as bar:
        # --all rebuilds in lockstep (each batch read once for every projection): one bar.
        task = bar.add_task("all projections" if every else names[0], total=None, rate=0.0, left=0)
        started = time.perf_counter()
        seen = _Seen()

        def report(position: int, head: int) -> None:
            seen.add(position)
            bar.update(task, completed=position, total=head, rate=seen.rate(), left=head - position)

        def run(settings: Settings) -> None:
            rebuild(settings, None if every else names[0], report)

        try:
            _with_database(run)
        except RebuildInProgressError as e:
            _fail("conflict", str(e), Exit.FAILED)
        seconds = round(time.perf_counter() - started, 3)
        done = [{"name": n, "position": seen.last, "seconds": seconds} for n in names]
    _emit(
        {"ok": True, "rebuilt": done},
        "\n".join(
            f"rebuilt [bold]{d['name']}[/] up to {d['position']} in {d['seconds']} s" for d in done
        ),
    )


class _Seen:
    """The last position a rebuild reported, for its events-per-second figure."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.last = 0

    def add(self, position: int) -> None:
        self.last = position

    def rate(self) -> float:
        # A rebuild reads the store from its first event, so its rate is position over time.
        return self.last / max(time.perf_counter() - self.started, 1e-9)


def _with_database(action: Callable[[Settings], T]) -> T:
    """Run ``action`` on the configured database; say which server failed if it is down."""
    import psycopg

    from infrastructure.postgres.read_models import ReadModelsMissingError
    from infrastructure.postgres.schema import PostgresParams

    settings = _settings()
    try:
        return action(settings)
    except (psycopg.errors.UndefinedTable, ReadModelsMissingError) as e:
        _fail(
            "unavailable",
            f"the database has no ledgerflow tables yet: {str(e).splitlines()[0]}",
            Exit.UNAVAILABLE,
            hint="create them with `ledgerflow db init` (it is idempotent)",
        )
        raise AssertionError("unreachable") from e
    except psycopg.OperationalError as e:
        params = PostgresParams.from_url(settings.database_url)
        _fail(
            "unavailable",
            f"cannot reach PostgreSQL at {params.host}:{params.port}: {str(e).strip()}",
            Exit.UNAVAILABLE,
            hint="start it with `make up`, or set LEDGERFLOW_DATABASE_URL",
        )
        raise AssertionError("unreachable") from e


class Role(StrEnum):
    COMMANDS = "commands"
    RELAY = "relay"
    PROJECTIONS = "projections"
    API = "api"
    SCHEDULER = "scheduler"
    ALL = "all"


@app.command()
def serve(
    role: Annotated[
        list[Role], typer.Option("--role", "-r", help="what to run; repeat it, or 'all'")
    ] = [Role.ALL],  # noqa: B006 - typer reads the default, never mutates it
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Run service roles (commands, relay, projections, api) until SIGTERM."""
    import asyncio

    from infrastructure.serve import ROLES
    from infrastructure.serve import serve as serve_roles
    from infrastructure.telemetry import telemetry

    settings = _settings()
    roles = list(ROLES) if Role.ALL in role else list(dict.fromkeys(r.value for r in role))
    from infrastructure.postgres.read_models import ReadModelsMissingError
    from infrastructure.postgres.scheduler_schema import SchedulerTablesMissingError

    try:
        with telemetry(settings, role="serve", level=log_level):  # logs, traces, metrics port
            asyncio.run(serve_roles(settings, roles))
    except OSError as e:  # unreachable NATS or database, a port already in use
        _fail("unavailable", str(e), Exit.UNAVAILABLE)
    except (ReadModelsMissingError, SchedulerTablesMissingError) as e:
        _fail("unavailable", str(e), Exit.UNAVAILABLE, hint="`ledgerflow db init` creates them")


@app.command()
def worker(
    target: Annotated[str, typer.Argument(help="MODULE:FLOW, the Flow to serve")],
    concurrency: Annotated[int, typer.Option(min=1, help="tasks in hand at most")] = 10,
    ack_wait: Annotated[
        float, typer.Option(min=0.5, help="heartbeat timeout in seconds (JetStream ack_wait)")
    ] = 30.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Run a worker for a flow's workflows until SIGTERM."""
    import asyncio
    import importlib
    import signal

    from infrastructure.telemetry import telemetry
    from ledgerflow.flow import Flow
    from ledgerflow.worker import Worker

    module_name, _, attribute = target.partition(":")
    try:
        flow = getattr(importlib.import_module(module_name), attribute or "flow")
    except (ImportError, AttributeError) as e:
        _fail("invalid_command", f"cannot load {target}: {e}", Exit.USAGE)
        return
    if not isinstance(flow, Flow):
        _fail("invalid_command", f"{target} is not a ledgerflow Flow", Exit.USAGE)
    settings = _settings()

    async def serve_flow() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Worker(flow, settings, concurrency, ack_wait=ack_wait).run(stop)

    try:
        with telemetry(settings, role="worker", level=log_level):  # logs, traces, metrics port
            asyncio.run(serve_flow())
    except OSError as e:  # unreachable NATS, a metrics port in use
        _fail("unavailable", str(e), Exit.UNAVAILABLE)


def _settings() -> Settings:
    from pydantic import ValidationError

    from infrastructure.settings import Settings

    try:
        overrides = {"database_url": state.database_url} if state.database_url else {}
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        _fail("invalid_command", f"invalid settings: {e.errors()[0]['msg']}", Exit.USAGE)
        raise AssertionError("unreachable") from e


def main() -> None:
    app()
