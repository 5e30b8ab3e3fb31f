"""The ``ledgerflow`` command line (Typer + Rich); ``-o json`` for scripts."""

from __future__ import annotations

import json
import sys
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from ledgerflow import __version__

if TYPE_CHECKING:
    from infrastructure.settings import Settings


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


class Role(StrEnum):
    COMMANDS = "commands"
    RELAY = "relay"
    PROJECTIONS = "projections"
    API = "api"
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
    import logging

    from infrastructure.serve import ROLES
    from infrastructure.serve import serve as serve_roles

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = _settings()
    roles = list(ROLES) if Role.ALL in role else list(dict.fromkeys(r.value for r in role))
    try:
        asyncio.run(serve_roles(settings, roles))
    except ConnectionError as e:
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
