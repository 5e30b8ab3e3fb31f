"""The ``ledgerflow`` command line (Typer + Rich); ``-o json`` for scripts."""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console, RenderableType
from rich.markup import escape
from typer.core import TyperGroup

from ledgerflow import __version__
from ledgerflow._details import detail_line

if TYPE_CHECKING:
    from infrastructure.settings import Settings
    from ledgerflow._api import Api, ApiError
    from ledgerflow.flow import Flow

T = TypeVar("T")


class Output(StrEnum):
    TABLE = "table"
    JSON = "json"


class Exit(IntEnum):
    """What the CLI's exit status means; docs/cli.md shows EXIT_MEANINGS as a table."""

    OK = 0
    FAILED = 1
    USAGE = 2
    UNAVAILABLE = 3
    NOT_FOUND = 4
    TIMEOUT = 5


EXIT_MEANINGS: dict[Exit, str] = {
    Exit.OK: "done; with `start --wait`, the run completed",
    Exit.FAILED: "the service refused the command (`invalid_state`, `conflict`, `internal`, "
    "...), or the run waited for failed or was cancelled",
    Exit.USAGE: "invalid usage or input: an unknown option, JSON that does not parse, a "
    "request the service calls `invalid_command` or `too_large`",
    Exit.UNAVAILABLE: "a dependency is unreachable or not ready: the API, NATS or PostgreSQL "
    "(`unavailable`, `projection_behind`), or missing tables",
    Exit.NOT_FOUND: "no such run, workflow or event (`run_not_found`, `unknown_workflow`, "
    "`not_found`)",
    Exit.TIMEOUT: "`start --wait` gave up after `--timeout` seconds; the run goes on",
}

EXIT_OF_CODE: dict[str, Exit] = {
    "invalid_command": Exit.USAGE,
    "too_large": Exit.USAGE,
    "unavailable": Exit.UNAVAILABLE,
    "projection_behind": Exit.UNAVAILABLE,
    "run_not_found": Exit.NOT_FOUND,
    "unknown_workflow": Exit.NOT_FOUND,
    "not_found": Exit.NOT_FOUND,
}
"""The exit status for each error code of the contract; any other code is Exit.FAILED."""

INTERRUPTED = 130
"""Ctrl-C, as shells report SIGINT (128 + 2)."""

START_AN_API = (
    "start one with `ledgerflow dev` (everything in one process), or `ledgerflow serve` "
    "(`make serve`); or point --api-url or LEDGERFLOW_API_URL at a running one"
)


def _base(kind: type[Exception], name: str) -> type[Exception]:
    found: type[Exception] = next(k for k in kind.__mro__ if k.__name__ == name)
    return found


# Click's exception classes, taken from a public one: recent Typer vendors its own Click.
_ClickException = _base(typer.BadParameter, "ClickException")
_UsageError = _base(typer.BadParameter, "UsageError")


class _Group(TyperGroup):
    """The root command: with ``-o json``, usage errors too are one JSON error body."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode or not _asks_for_json(argv):
            return super().main(
                argv, prog_name, complete_var, standalone_mode, windows_expand_args, **extra
            )
        try:
            code = super().main(argv, prog_name, complete_var, False, windows_expand_args, **extra)
        except _ClickException as e:
            usage = isinstance(e, _UsageError)
            message = e.format_message()  # type: ignore[attr-defined]
            _write_json(_error_body("invalid_command" if usage else "failed", message))
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        except typer.Abort:
            _write_json(_error_body("aborted", "aborted"))
            sys.exit(int(Exit.FAILED))
        sys.exit(code if isinstance(code, int) else 0)


def _asks_for_json(argv: list[str]) -> bool:
    """Whether the command line asks for ``-o json`` (before Click has parsed it)."""
    for word, following in zip(argv, [*argv[1:], ""], strict=True):
        if word == "--":
            return False
        if word in ("-o", "--output") and following == "json":
            return True
        if word in ("-ojson", "--output=json"):
            return True
    return False


app = typer.Typer(
    name="ledgerflow",
    cls=_Group,
    help="Durable workflows for Python on an event-sourced core.",
    epilog="Exit status: "
    + "; ".join(f"{int(code)} {code.name.lower().replace('_', ' ')}" for code in Exit)
    + ". See docs/cli.md.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Manage the event-store database.", no_args_is_help=True)
app.add_typer(db_app, name="db")
projections_app = typer.Typer(help="Read models: lag, and rebuilds.", no_args_is_help=True)
app.add_typer(projections_app, name="projections")
runs_app = typer.Typer(
    help="Look at runs, cancel them, retry failed ones (through the HTTP API).",
    no_args_is_help=True,
)
app.add_typer(runs_app, name="runs")

console = Console()
err_console = Console(stderr=True)


class State:
    output: Output = Output.TABLE
    database_url: str | None = None
    nats_url: str | None = None
    api_url: str | None = None


state = State()


@app.callback()
def _global(
    output: Annotated[
        Output, typer.Option("--output", "-o", help="table for humans, json for scripts")
    ] = Output.TABLE,
    api_url: Annotated[
        str | None,
        typer.Option(
            help="The ledgerflow HTTP API that start, send and runs talk to "
            "(default: $LEDGERFLOW_API_URL, else http://$LEDGERFLOW_API_HOST:$LEDGERFLOW_API_PORT,"
            " which is http://127.0.0.1:8080)",
            show_default=False,
        ),
    ] = None,
    nats_url: Annotated[
        str | None,
        typer.Option(
            help="NATS URL for serve and worker (default: $LEDGERFLOW_NATS_URL, "
            "which is nats://127.0.0.1:4222)",
            show_default=False,
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(help="PostgreSQL URL (default: $LEDGERFLOW_DATABASE_URL)", show_default=False),
    ] = None,
) -> None:
    state.output = output
    state.api_url = api_url
    state.nats_url = nats_url
    state.database_url = database_url


def _write_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data) + "\n")


def _error_body(code: str, message: str, details: Sequence[Any] = ()) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message, "details": list(details)}}


def _emit(data: dict[str, Any], human: RenderableType) -> None:
    if state.output is Output.JSON:
        _write_json(data)
    else:
        console.print(human)


def _fail(
    code: str,
    message: str,
    exit_code: int,
    hint: str | None = None,
    *,
    details: Sequence[Any] = (),
    extra: dict[str, Any] | None = None,
    details_for_people: bool = True,
) -> NoReturn:
    """Say what went wrong (stderr, or the JSON error body on stdout) and exit ``exit_code``.

    ``extra`` adds top-level keys to the JSON body (a run's id and status, say).
    """
    if state.output is Output.JSON:
        _write_json({**_error_body(code, message, details), **(extra or {})})
    else:
        err_console.print(f"[bold red]error[/] [dim]({escape(code)})[/]: {escape(message)}")
        for line in _detail_lines(details if details_for_people else ()):
            err_console.print(f"  - {escape(line)}", highlight=False)
        if hint:
            err_console.print(hint, highlight=False)
    raise typer.Exit(int(exit_code))


def _detail_lines(details: Sequence[Any]) -> list[str]:
    """A refusal's details for people: ``loc: msg`` for validation errors, else the JSON."""
    return [detail_line(detail) or json.dumps(detail) for detail in details]


@app.command()
def version() -> None:
    """Print the ledgerflow version."""
    _emit({"version": __version__}, f"ledgerflow {__version__}")


# -- client commands: through the HTTP API (ADR 10), so `serve` and `dev` both answer them --


@app.command()
def start(
    workflow: Annotated[str, typer.Argument(help="the workflow's name")],
    input: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            help="the run's input as JSON; @FILE reads a file, - reads stdin (default: null)",
            show_default=False,
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(help="idempotency key: a start with the same key lands on the same run"),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="wait until the run ends, then print its output")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=0, help="seconds --wait waits before giving up (exit 5)")
    ] = 60.0,
) -> None:
    """Start a run of WORKFLOW; with --wait, wait for its end and print its output."""
    body = {"workflow": workflow, "input": _json_option("--input", input), "key": key}
    with _api() as api:
        reply = _call(lambda: api.command("start_run", body))
        run_id = str(reply["run_id"])
        if not wait:
            _emit(reply, _started(workflow, run_id, reply, key))
            return
        if state.output is Output.TABLE:
            err_console.print(_started(workflow, run_id, reply, key))
        run = _wait_for_end(api, run_id, timeout, int(reply["position"]))
    result = {**reply, "status": run["status"], "output": run.get("output")}
    if run["status"] != "completed":
        error = run.get("error") or {}
        _fail(
            f"run_{run['status']}",
            f"run {run_id} {run['status']}: {_failure(error, run['status'])}",
            Exit.FAILED,
            hint=f"see why with `ledgerflow runs show {run_id}`",
            details=[error] if error else [],
            extra={k: v for k, v in result.items() if k != "ok"},
            details_for_people=False,  # the message says it already
        )
    if state.output is Output.JSON:
        _write_json(result)
    else:
        err_console.print(f"run {run_id} [green]completed[/]")
        console.print_json(json.dumps(run.get("output")))


def _started(workflow: str, run_id: str, reply: dict[str, Any], key: str | None) -> str:
    if reply.get("created", True):
        return f"started run [bold]{run_id}[/] of {escape(workflow)}"
    return f"run [bold]{run_id}[/] already exists for key {escape(repr(key))}: nothing started"


def _wait_for_end(api: Api, run_id: str, timeout: float, position: int) -> dict[str, Any]:
    from ledgerflow._api import WaitTimeoutError

    progress = (
        err_console.status(f"waiting for run {run_id}", spinner="dots")
        if state.output is Output.TABLE
        else contextlib.nullcontext()
    )
    try:
        with progress:
            return _call(lambda: api.wait_for_end(run_id, timeout, min_position=position))
    except WaitTimeoutError as e:
        seen = e.run or {}
        _fail(
            "timeout",
            str(e),
            Exit.TIMEOUT,
            hint=f"it goes on: `ledgerflow runs show {run_id}`, or wait longer with --timeout",
            extra={"run_id": run_id, "status": seen.get("status")},
        )
    except KeyboardInterrupt:
        _fail(
            "interrupted",
            f"stopped waiting for run {run_id}",
            INTERRUPTED,
            hint=f"it goes on: `ledgerflow runs show {run_id}`",
            extra={"run_id": run_id},
        )


def _failure(error: dict[str, Any], status: str) -> str:
    from ledgerflow._render import failure

    return failure(error) or status


@app.command()
def send(
    name: Annotated[str, typer.Argument(help="the event's name, e.g. order.placed")],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="the event's data, a JSON object; @FILE reads a file, - reads stdin",
        ),
    ] = "{}",
    id: Annotated[
        str | None,
        typer.Option("--id", help="the event's own id: the same id is sent once"),
    ] = None,
) -> None:
    """Send event NAME: it starts the workflows it triggers and wakes the runs waiting for it."""
    payload = _json_option("--data", data)
    if not isinstance(payload, dict):
        _fail(
            "invalid_command",
            f"--data must be a JSON object, not {type(payload).__name__}: {data}",
            Exit.USAGE,
        )
    with _api() as api:
        reply = _call(lambda: api.command("send_event", {"name": name, "data": payload, "id": id}))
    event_id = reply["event_id"]
    human = (
        f"sent event [bold]{escape(name)}[/] as {event_id}"
        if reply.get("created", True)
        else f"event {event_id} (--id {escape(repr(id))}) was sent before: nothing sent"
    )
    _emit(reply, human)


@runs_app.command("list")
def runs_list(
    workflow: Annotated[str | None, typer.Option(help="only this workflow's runs")] = None,
    status: Annotated[
        str | None,
        typer.Option(
            help="only runs in this status: queued, running, sleeping, waiting, compensating, "
            "completed, failed, cancelled"
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="runs per page")] = 50,
    cursor: Annotated[
        str | None, typer.Option(help="the next page: the cursor the previous page ended with")
    ] = None,
    min_position: Annotated[
        int | None,
        typer.Option(min=0, help="first wait until the read model has reached this position"),
    ] = None,
) -> None:
    """Runs, newest first, a page at a time."""
    from ledgerflow._render import runs_table

    with _api() as api:
        page = _call(
            lambda: api.list_runs(
                workflow=workflow,
                status=status,
                limit=limit,
                cursor=cursor,
                min_position=min_position,
            )
        )
    _emit(page, runs_table(page))
    if state.output is Output.TABLE and page.get("next_cursor"):
        given = {"--workflow": workflow, "--status": status, "--limit": limit}
        again = [f"{option} {shlex.quote(str(v))}" for option, v in given.items() if v is not None]
        command = " ".join(["ledgerflow runs list", *again, "--cursor", page["next_cursor"]])
        # soft_wrap: never cut, so that the command can be copied in one piece
        console.print(f"more: {escape(command)}", style="dim", soft_wrap=True, highlight=False)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="the run's id")],
    min_position: Annotated[
        int | None,
        typer.Option(min=0, help="first wait until the read model has reached this position"),
    ] = None,
) -> None:
    """A run: its status, input, output or error, and its steps, sleeps, waits and children."""
    from ledgerflow._render import run_detail

    with _api() as api:
        run = _call(lambda: api.get_run(run_id, min_position=min_position))
    _emit(run, run_detail(run))


@runs_app.command("history")
def runs_history(run_id: Annotated[str, typer.Argument(help="the run's id")]) -> None:
    """Every event of a run, from the event store."""
    from ledgerflow._render import history_table

    with _api() as api:
        history = _call(lambda: api.run_history(run_id))
    _emit(history, history_table(history))


@runs_app.command("cancel")
def runs_cancel(
    run_id: Annotated[str, typer.Argument(help="the run's id")],
    reason: Annotated[str | None, typer.Option(help="why, kept in the run's history")] = None,
) -> None:
    """Cancel a run: its compensations run, then it ends as cancelled."""
    with _api() as api:
        reply = _call(lambda: api.command("cancel_run", {"run_id": run_id, "reason": reason}))
    _emit(reply, f"cancel requested for run [bold]{run_id}[/]")


@runs_app.command("retry")
def runs_retry(run_id: Annotated[str, typer.Argument(help="the id of a failed run")]) -> None:
    """Resume a failed run from its failed step, with fresh attempts."""
    with _api() as api:
        reply = _call(lambda: api.command("retry_run", {"run_id": run_id}))
    _emit(reply, f"run [bold]{run_id}[/] resumes from its failed step")


def _api() -> Api:
    from ledgerflow._api import Api

    return Api(_api_url())


def _api_url() -> str:
    return state.api_url.rstrip("/") if state.api_url else _settings().api_client_url


def _call(request: Callable[[], T]) -> T:
    """``request()``, or exit with its error: the API's code and message, and a hint."""
    from ledgerflow._api import ApiError, ApiUnreachableError

    try:
        return request()
    except ApiUnreachableError as e:
        _fail(e.code, e.message, Exit.UNAVAILABLE, hint=START_AN_API)
    except ApiError as e:
        _fail(e.code, e.message, EXIT_OF_CODE.get(e.code, Exit.FAILED), _hint(e), details=e.details)


def _hint(error: ApiError) -> str | None:
    if error.code == "unknown_workflow":
        return "a workflow exists once a worker serving it has started: `ledgerflow worker ...`"
    if error.code == "projection_behind":
        return "the read models are catching up: try again, or see `ledgerflow projections status`"
    return None


def _json_option(option: str, text: str | None) -> Any:
    """The JSON value an option gives (inline, ``@FILE`` or ``-`` for stdin); exit 2 if bad."""
    if text is None:
        return None
    source = text
    if text == "-":
        source = sys.stdin.read()
    elif text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as file:
                source = file.read()
        except OSError as e:
            _fail("invalid_command", f"{option}: cannot read {text[1:]}: {e.strerror}", Exit.USAGE)
    try:
        return json.loads(source)
    except ValueError as e:
        _fail(
            "invalid_command",
            f"{option} is not valid JSON: {e}",
            Exit.USAGE,
            hint=f"""quote it for the shell, e.g. {option} '{{"n": 1}}' (a string is '"text"')""",
        )


# -- operator commands: the database, the read models, the services ------------------------


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


VIA_API = typer.Option(
    "--api",
    help="ask the API (--api-url) instead of the database: what `ledgerflow dev` needs, "
    "whose read models live in its process",
)


@projections_app.command("status")
def projections_status(via_api: Annotated[bool, VIA_API] = False) -> None:
    """Every projection's position, the store's head, and the lag between them."""
    from rich.table import Table

    if via_api:
        with _api() as api:
            rows: list[dict[str, Any]] = _call(api.projections)
    else:
        from infrastructure.postgres.read_models import status

        rows = [vars(row) for row in _with_database(status)]
    if state.output is Output.JSON:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table("projection", "version", "position", "head", "lag", "state")
    for row in rows:
        lag = f"[green]{row['lag']}[/]" if row["lag"] == 0 else f"[yellow]{row['lag']}[/]"
        version = str(row.get("version", "-"))
        table.add_row(
            row["name"], version, str(row["position"]), str(row["head"]), lag, row["state"]
        )
    console.print(table)


@projections_app.command("rebuild")
def projections_rebuild(
    name: Annotated[str | None, typer.Argument(help="runs, workflows or inbound_events")] = None,
    every: Annotated[bool, typer.Option("--all", help="rebuild every projection")] = False,
    via_api: Annotated[bool, VIA_API] = False,
    timeout: Annotated[
        float, typer.Option(min=1, help="with --api: seconds to wait for the rebuild")
    ] = 600.0,
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
    if via_api:
        _rebuild_through_api(names, timeout)
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


def _rebuild_through_api(names: list[str], timeout: float) -> None:
    """Start each rebuild in the API's process, one after the other, and wait for it."""
    from functools import partial

    done = []
    with _api() as api:
        for name in names:
            started = time.monotonic()
            outcome = _call(partial(api.rebuild, name))
            while outcome["state"] == "running":
                if time.monotonic() - started > timeout:
                    _fail("timeout", f"rebuilding {name} took over {timeout:g} s", Exit.TIMEOUT)
                time.sleep(0.2)
                outcome = _call(partial(api.rebuild_outcome, name))
            if outcome["state"] == "failed":
                _fail("internal", f"rebuilding {name} failed: {outcome['error']}", Exit.FAILED)
            seconds = round(time.monotonic() - started, 3)
            done.append({"name": name, "seconds": seconds})
    _emit(
        {"ok": True, "rebuilt": done},
        "\n".join(f"rebuilt [bold]{d['name']}[/] in {d['seconds']} s" for d in done),
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

    from infrastructure.serve import ROLES
    from infrastructure.serve import serve as serve_roles
    from infrastructure.telemetry import telemetry

    settings = _settings()
    roles = list(ROLES) if Role.ALL in role else list(dict.fromkeys(r.value for r in role))
    from infrastructure.postgres.read_models import ReadModelsMissingError
    from infrastructure.postgres.scheduler_schema import SchedulerTablesMissingError

    # Every role needs both: say which one is missing now rather than retry it in a loop.
    _require_database(settings)
    _require_nats(settings)
    try:
        with telemetry(settings, role="serve", level=log_level):  # logs, traces, metrics port
            _run_loop(serve_roles(settings, roles))
    except OSError as e:  # NATS or the database gone since, a port already in use
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
    import signal

    from infrastructure.telemetry import telemetry
    from ledgerflow.worker import Worker

    flow = _load_flows([target])[0]
    settings = _settings()
    _require_nats(settings)

    async def serve_flow() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Worker(flow, settings, concurrency, ack_wait=ack_wait).run(stop)

    try:
        with telemetry(settings, role="worker", level=log_level):  # logs, traces, metrics port
            _run_loop(serve_flow())
    except OSError as e:  # unreachable NATS, a metrics port in use
        _fail("unavailable", str(e), Exit.UNAVAILABLE)


@app.command()
def dev(
    targets: Annotated[
        list[str] | None,
        typer.Argument(help="MODULE:FLOW (or MODULE, meaning MODULE:flow) to run a worker for"),
    ] = None,
    db: Annotated[
        Path, typer.Option(help="the embedded store's file (created on first use)")
    ] = Path(".ledgerflow/dev.db"),
    host: Annotated[str, typer.Option(help="where the API and UI listen")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="the API and UI port")] = 8080,
    start: Annotated[
        list[str] | None,
        typer.Option(help="WORKFLOW or WORKFLOW=JSON: start a run once up (repeatable)"),
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="tasks in hand at most")] = 10,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Everything in one process with zero external services: an embedded store (SQLite),
    in-process delivery, the API and web UI, the process managers, and a worker for each
    flow. Ctrl-C stops it; runs resume where they were at the next start."""
    import asyncio

    from infrastructure.embedded.dev import parse_start, run_dev
    from infrastructure.telemetry import telemetry

    flows = _load_flows(targets or [])
    try:
        starts = [parse_start(spec) for spec in start or []]
    except ValueError as e:
        _fail("invalid_command", str(e), Exit.USAGE)
        return
    settings = _settings().model_copy(
        update={
            "database_url": f"sqlite:///{db.expanduser().resolve()}",
            "api_host": host,
            "api_port": port,
        }
    )
    try:
        with telemetry(settings, role="dev", level=log_level):
            asyncio.run(
                run_dev(settings, flows, starts, concurrency=concurrency, say=console.print)
            )
    except OSError as e:  # the port in use, the store's folder not writable
        _fail("unavailable", str(e), Exit.UNAVAILABLE, hint="try another --port or --db")


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run``, on uvloop's event loop where it is installed (it is a dependency;
    a platform without it runs on asyncio's own loop): serve and the worker spend much of
    their time in the event loop and its transports (docs/performance.md, row 13)."""
    import asyncio

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def _say(line: str) -> None:
    """A line as it is: no markup, no wrapping (a URL must stay one word)."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _load_flows(targets: list[str]) -> list[Flow]:
    """The flows ``MODULE:FLOW`` name, importable from the current directory too (as
    ``python -m`` would); exit 2 saying which cannot be loaded."""
    import os
    import sys

    from ledgerflow.flow import load_flow

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    flows = []
    for target in targets:
        try:
            flows.append(load_flow(target))
        except ValueError as e:
            _fail("invalid_command", str(e), Exit.USAGE)
    return flows


START_NATS = (
    "start it with `make up`, or point --nats-url or LEDGERFLOW_NATS_URL at a running nats-server"
)


def _require_nats(settings: Settings) -> None:
    """Exit 3, naming the URL, if no NATS server answers at ``settings.nats_url``."""
    import asyncio

    from infrastructure.nats.connect import NatsUnavailableError, connect

    async def probe() -> None:
        nc = await connect(settings, name="ledgerflow-cli-probe")
        await nc.close()

    try:
        asyncio.run(probe())
    except NatsUnavailableError as e:
        _fail("unavailable", str(e), Exit.UNAVAILABLE, hint=START_NATS)


def _require_database(settings: Settings) -> None:
    """Exit 3, naming the server and database, if PostgreSQL does not answer or lacks it."""
    if not settings.uses_postgres:
        return
    import psycopg

    from infrastructure.postgres.schema import PostgresParams

    params = PostgresParams.from_url(settings.database_url)
    try:
        psycopg.connect(params.conninfo(), connect_timeout=settings.db_connect_timeout).close()
    except psycopg.OperationalError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        missing = f'database "{params.dbname}" does not exist' in str(e)
        _fail(
            "unavailable",
            f"cannot use PostgreSQL database {params.dbname} at {params.host}:{params.port}: "
            f"{reason}",
            Exit.UNAVAILABLE,
            hint="create it with `ledgerflow db init`"
            if missing
            else "start it with `make up`, or point --database-url or LEDGERFLOW_DATABASE_URL "
            "at a running server",
        )


def _settings() -> Settings:
    from pydantic import ValidationError

    from infrastructure.settings import Settings

    try:
        overrides = {"database_url": state.database_url, "nats_url": state.nats_url}
        given = {name: value for name, value in overrides.items() if value}
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as e:
        _fail("invalid_command", f"invalid settings: {e.errors()[0]['msg']}", Exit.USAGE)
        raise AssertionError("unreachable") from e


def main() -> None:
    app()
