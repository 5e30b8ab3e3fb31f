"""The client commands of the CLI against a fake HTTP API: parsing, output, exit codes."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from infrastructure.settings import Settings
from ledgerflow import cli
from ledgerflow._api import Api
from tests.support.servers import free_port

RUN_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "run"))
EVENT_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "event"))

Handler = Callable[[httpx.Request], httpx.Response]


def run_detail(status: str = "running", **fields: Any) -> dict[str, Any]:
    return {
        "run_id": RUN_ID,
        "workflow": "greet",
        "key": None,
        "status": status,
        "input": {"name": "ada"},
        "output": None,
        "error": None,
        "created_at": "2026-11-24T10:00:00Z",
        "updated_at": "2026-11-24T10:00:01Z",
        "steps": [
            {
                "name": "greet",
                "status": "completed",
                "attempts": 1,
                "output": "hello ada",
                "error": None,
                "started_at": "2026-11-24T10:00:00Z",
                "finished_at": "2026-11-24T10:00:01Z",
            }
        ],
        "sleeps": [],
        "waits": [],
        "children": [],
        "sent_events": [],
        "version": 3,
        **fields,
    }


def error(status: int, code: str, message: str, details: list[Any] | None = None) -> httpx.Response:
    body = {"ok": False, "error": {"code": code, "message": message, "details": details or []}}
    return httpx.Response(status, json=body)


class FakeApi:
    """Answers by (method, path) and keeps every request it got."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.requests: list[httpx.Request] = []

    def on(self, method: str, path: str, *answers: httpx.Response | Handler) -> None:
        """Answer ``method path`` with ``answers`` in turn, the last one from then on."""
        queue = list(answers)

        def answer(request: httpx.Request) -> httpx.Response:
            current = queue.pop(0) if len(queue) > 1 else queue[0]
            return current(request) if callable(current) else current

        self.routes[(method, path)] = answer

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        route = self.routes.get((request.method, request.url.path))
        if route is None:
            return error(404, "not_found", f"no route {request.method} {request.url.path}")
        return route(request)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.url.path == path]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables as wide as a real terminal's (CliRunner's default is 80 columns)."""
    monkeypatch.setattr(cli, "console", Console(width=200))
    monkeypatch.setattr(cli, "err_console", Console(stderr=True, width=200))


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApi]:
    fake = FakeApi()
    transport = httpx.MockTransport(fake.handle)
    monkeypatch.setattr(cli, "_api", lambda: Api("http://api.test", transport=transport))
    yield fake


def ledgerflow(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli.app, list(args), input=input)


def flat(text: str) -> str:
    """``text`` on one line: Rich wraps what it prints at the console's width."""
    return " ".join(text.split())


def only_json(result: Result) -> Any:
    """The one JSON document on stdout (it fails if there is anything else)."""
    return json.loads(result.stdout)


# -- input and usage --------------------------------------------------------------------------


def test_input_that_is_not_json_names_the_option_and_exits_2_before_any_request(
    api: FakeApi,
) -> None:
    result = ledgerflow("start", "greet", "--input", "{name: ada}")
    assert result.exit_code == 2
    assert "--input is not valid JSON: Expecting property name" in flat(result.stderr)
    assert api.requests == []

    result = ledgerflow("-o", "json", "send", "paid", "--data", "[1")
    assert result.exit_code == 2
    body = only_json(result)
    assert body["ok"] is False
    assert body["error"]["code"] == "invalid_command"
    assert body["error"]["message"].startswith("--data is not valid JSON")


def test_event_data_must_be_an_object(api: FakeApi) -> None:
    result = ledgerflow("-o", "json", "send", "paid", "--data", "[1, 2]")
    assert result.exit_code == 2
    assert "--data must be a JSON object" in only_json(result)["error"]["message"]
    assert api.requests == []


def test_input_is_read_from_a_file_or_stdin(api: FakeApi, tmp_path: Path) -> None:
    reply = {"ok": True, "run_id": RUN_ID, "created": True, "position": 7}
    api.on("POST", "/commands/start_run", httpx.Response(200, json=reply))
    file = tmp_path / "input.json"
    file.write_text('{"name": "from a file"}')

    assert ledgerflow("start", "greet", "--input", f"@{file}").exit_code == 0
    assert ledgerflow("start", "greet", "--input", "-", input='{"name": "piped"}').exit_code == 0
    missing = ledgerflow("start", "greet", "--input", f"@{tmp_path / 'nope.json'}")

    inputs = [body["input"] for body in api.bodies("/commands/start_run")]
    assert inputs == [{"name": "from a file"}, {"name": "piped"}]
    assert missing.exit_code == 2
    assert "--input: cannot read" in flat(missing.stderr)


def test_usage_errors_exit_2_and_are_one_json_document_with_o_json() -> None:
    human = ledgerflow("start")
    assert human.exit_code == 2
    assert "Missing argument" in human.output

    scripted = ledgerflow("-o", "json", "runs", "list", "--limit", "0")
    assert scripted.exit_code == 2
    body = only_json(scripted)
    assert body["ok"] is False and body["error"]["code"] == "invalid_command"
    assert "--limit" in body["error"]["message"]


# -- an unreachable API -----------------------------------------------------------------------


def test_an_unreachable_api_names_its_url_says_how_to_start_one_and_exits_3() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = ledgerflow("--api-url", url, "runs", "list")
    assert result.exit_code == 3
    err = flat(result.stderr)
    assert f"cannot reach the ledgerflow API at {url}" in err
    assert "ledgerflow dev" in err and "ledgerflow serve" in err and "make serve" in err

    scripted = ledgerflow("-o", "json", "--api-url", url, "start", "greet")
    assert scripted.exit_code == 3
    body = only_json(scripted)
    assert body["error"]["code"] == "unavailable"
    assert url in body["error"]["message"]


def test_a_server_that_is_not_a_ledgerflow_api_is_reported_as_such(api: FakeApi) -> None:
    api.on("GET", "/runs", httpx.Response(404, text="<html>nginx</html>"))
    result = ledgerflow("-o", "json", "runs", "list")
    assert result.exit_code == 3
    assert "is a ledgerflow API listening there?" in only_json(result)["error"]["message"]


def test_the_api_url_comes_from_the_environment_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LEDGERFLOW_API_URL", "http://api.example:9000/")
    assert cli._settings().api_client_url == "http://api.example:9000"
    monkeypatch.delenv("LEDGERFLOW_API_URL")
    assert Settings(api_host="0.0.0.0", api_port=8123).api_client_url == "http://127.0.0.1:8123"
    assert Settings(api_host="::1").api_client_url == "http://[::1]:8080"
    port = free_port()
    monkeypatch.setenv("LEDGERFLOW_API_PORT", str(port))
    result = ledgerflow("-o", "json", "runs", "list")
    assert f"http://127.0.0.1:{port}" in only_json(result)["error"]["message"]


# -- start ------------------------------------------------------------------------------------


def test_start_sends_start_run_and_prints_the_reply(api: FakeApi) -> None:
    reply = {"ok": True, "run_id": RUN_ID, "created": True, "position": 7}
    api.on("POST", "/commands/start_run", httpx.Response(200, json=reply))

    scripted = ledgerflow(
        "-o", "json", "start", "greet", "--input", '{"name": "ada"}', "--key", "k"
    )
    assert scripted.exit_code == 0
    assert only_json(scripted) == reply
    assert api.bodies("/commands/start_run") == [
        {"workflow": "greet", "input": {"name": "ada"}, "key": "k"}
    ]

    human = ledgerflow("start", "greet")
    assert human.exit_code == 0
    assert f"started run {RUN_ID} of greet" in human.stdout
    assert api.bodies("/commands/start_run")[-1] == {"workflow": "greet"}


def test_start_wait_reads_its_own_write_then_prints_the_output_of_the_completed_run(
    api: FakeApi,
) -> None:
    api.on(
        "POST",
        "/commands/start_run",
        httpx.Response(200, json={"ok": True, "run_id": RUN_ID, "created": True, "position": 7}),
    )
    done = run_detail("completed", output={"greeting": "hello ada"})
    api.on(
        "GET",
        f"/runs/{RUN_ID}",
        httpx.Response(200, json=run_detail("running")),
        error(503, "projection_behind", "the runs projection is at 6"),  # ridden out
        httpx.Response(200, json=done),
    )

    scripted = ledgerflow("-o", "json", "start", "greet", "--wait", "--timeout", "10")
    assert scripted.exit_code == 0, scripted.output
    assert only_json(scripted) == {
        "ok": True,
        "run_id": RUN_ID,
        "created": True,
        "position": 7,
        "status": "completed",
        "output": {"greeting": "hello ada"},
    }
    reads = [r for r in api.requests if r.method == "GET"]
    assert reads[0].url.params["min_position"] == "7"
    assert "min_position" not in reads[-1].url.params

    human = ledgerflow("start", "greet", "--wait")
    assert human.exit_code == 0
    assert json.loads(human.stdout) == {"greeting": "hello ada"}  # stdout: the output alone
    assert "completed" in human.stderr


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_start_wait_exits_1_when_the_run_fails_or_is_cancelled(api: FakeApi, status: str) -> None:
    api.on(
        "POST",
        "/commands/start_run",
        httpx.Response(200, json={"ok": True, "run_id": RUN_ID, "created": True, "position": 7}),
    )
    failure = {"type": "ValueError", "message": "no such customer"}
    api.on("GET", f"/runs/{RUN_ID}", httpx.Response(200, json=run_detail(status, error=failure)))

    scripted = ledgerflow("-o", "json", "start", "greet", "--wait")
    assert scripted.exit_code == 1
    body = only_json(scripted)
    assert body["ok"] is False
    assert (body["run_id"], body["status"]) == (RUN_ID, status)
    assert body["error"]["code"] == f"run_{status}"
    assert "ValueError: no such customer" in body["error"]["message"]
    assert body["error"]["details"] == [failure]

    human = ledgerflow("start", "greet", "--wait")
    assert human.exit_code == 1
    assert f"run {RUN_ID} {status}: ValueError: no such customer" in flat(human.stderr)
    assert f"ledgerflow runs show {RUN_ID}" in flat(human.stderr)


def test_start_wait_gives_up_after_its_timeout_with_exit_5(api: FakeApi) -> None:
    api.on(
        "POST",
        "/commands/start_run",
        httpx.Response(200, json={"ok": True, "run_id": RUN_ID, "created": True, "position": 7}),
    )
    api.on("GET", f"/runs/{RUN_ID}", httpx.Response(200, json=run_detail("waiting")))

    result = ledgerflow("-o", "json", "start", "greet", "--wait", "--timeout", "0.2")
    assert result.exit_code == 5
    body = only_json(result)
    assert body["error"]["code"] == "timeout"
    assert (body["run_id"], body["status"]) == (RUN_ID, "waiting")
    assert "still waiting after 0.2 s" in body["error"]["message"]


# -- refusals and their exit codes --------------------------------------------------------------


CONTRACT_EXITS = {
    "invalid_command": 2,
    "too_large": 2,
    "unknown_workflow": 4,
    "run_not_found": 4,
    "not_found": 4,
    "invalid_state": 1,
    "conflict": 1,
    "unauthorized": 1,
    "internal": 1,
    "unavailable": 3,
    "projection_behind": 3,
}


def test_every_error_code_of_the_contract_has_its_exit_status() -> None:
    exits = {code: int(cli.EXIT_OF_CODE.get(code, cli.Exit.FAILED)) for code in CONTRACT_EXITS}
    assert exits == CONTRACT_EXITS


@pytest.mark.parametrize(
    ("args", "path", "answer", "exit_code"),
    [
        (
            ["runs", "show", RUN_ID],
            f"/runs/{RUN_ID}",
            error(404, "run_not_found", f"run {RUN_ID} not found"),
            4,
        ),
        (
            ["start", "nope"],
            "/commands/start_run",
            error(404, "unknown_workflow", "no workflow named 'nope'"),
            4,
        ),
        (
            ["runs", "retry", RUN_ID],
            "/commands/retry_run",
            error(409, "invalid_state", f"run {RUN_ID} is running; only a failed run retries"),
            1,
        ),
        (
            ["runs", "cancel", "not-a-uuid"],
            "/commands/cancel_run",
            error(
                400,
                "invalid_command",
                "invalid cancel_run",
                [{"loc": ["run_id"], "msg": "Input should be a valid UUID", "type": "uuid"}],
            ),
            2,
        ),
        (
            ["send", "paid"],
            "/commands/send_event",
            error(503, "unavailable", "no command service answers on ledgerflow.cmd.send_event"),
            3,
        ),
    ],
)
def test_a_refusal_shows_its_code_and_message_and_exits_by_its_code(
    api: FakeApi, args: list[str], path: str, answer: httpx.Response, exit_code: int
) -> None:
    method = "POST" if path.startswith("/commands/") else "GET"
    api.on(method, path, answer)
    expected = answer.json()

    scripted = ledgerflow("-o", "json", *args)
    assert scripted.exit_code == exit_code
    assert only_json(scripted) == expected

    human = ledgerflow(*args)
    assert human.exit_code == exit_code
    err = flat(human.stderr)
    assert f"error ({expected['error']['code']}): {expected['error']['message']}" in err
    for detail in expected["error"]["details"]:
        assert f"run_id: {detail['msg']}" in err


# -- reads and the other writes -----------------------------------------------------------------


def test_runs_list_passes_its_filters_and_shows_a_page(api: FakeApi) -> None:
    summary = {
        "run_id": RUN_ID,
        "workflow": "greet",
        "key": "k-1",
        "status": "failed",
        "error_type": "ValueError",
        "created_at": "2026-11-24T10:00:00Z",
        "updated_at": "2026-11-24T10:00:01Z",
        "parent_run_id": None,
    }
    page = {"items": [summary], "next_cursor": "abc"}
    api.on("GET", "/runs", httpx.Response(200, json=page))

    args = ["runs", "list", "--workflow", "greet", "--status", "failed", "--limit", "1"]
    scripted = ledgerflow("-o", "json", *args, "--cursor", "xyz")
    assert scripted.exit_code == 0
    assert only_json(scripted) == page
    params = api.requests[-1].url.params
    assert dict(params) == {"workflow": "greet", "status": "failed", "limit": "1", "cursor": "xyz"}

    human = ledgerflow(*args)
    assert human.exit_code == 0
    for text in (RUN_ID, "greet", "k-1", "failed", "ValueError"):
        assert text in human.stdout
    next_page = "ledgerflow runs list --workflow greet --status failed --limit 1 --cursor abc"
    assert f"more: {next_page}" in human.stdout


def test_runs_list_keeps_run_ids_whole_in_80_columns(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = {
        "run_id": RUN_ID,
        "workflow": "a_workflow_with_a_long_name",
        "key": "customer-1234567890",
        "status": "compensating",
        "error_type": "StepFailedError",
        "created_at": "2026-11-24T10:00:00.123456+00:00",
        "updated_at": "2026-11-24T10:00:01Z",
        "parent_run_id": None,
    }
    api.on("GET", "/runs", httpx.Response(200, json={"items": [summary], "next_cursor": None}))
    monkeypatch.setattr(cli, "console", Console(width=80))

    human = ledgerflow("runs", "list")
    assert human.exit_code == 0
    assert RUN_ID in human.stdout
    assert "compensating" in human.stdout and "2026-11-24 10:00" in human.stdout
    assert max(len(line) for line in human.stdout.splitlines()) <= 80


def test_runs_show_and_history_print_the_api_body_or_tables(api: FakeApi) -> None:
    detail = run_detail("completed", output="hello ada")
    history = {
        "events": [
            {
                "position": 5,
                "version": 1,
                "type": "RunStarted",
                "timestamp": "2026-11-24T10:00:00Z",
                "data": {"workflow": "greet"},
            }
        ]
    }
    api.on("GET", f"/runs/{RUN_ID}", httpx.Response(200, json=detail))
    api.on("GET", f"/runs/{RUN_ID}/history", httpx.Response(200, json=history))

    assert only_json(ledgerflow("-o", "json", "runs", "show", RUN_ID)) == detail
    assert only_json(ledgerflow("-o", "json", "runs", "history", RUN_ID)) == history

    shown = ledgerflow("runs", "show", RUN_ID)
    assert shown.exit_code == 0
    for text in (RUN_ID, "completed", "greet", '"hello ada"', "steps"):
        assert text in shown.stdout
    listed = ledgerflow("runs", "history", RUN_ID)
    assert listed.exit_code == 0
    assert "RunStarted" in listed.stdout and '{"workflow":"greet"}' in listed.stdout


def test_send_cancel_and_retry_send_their_commands(api: FakeApi) -> None:
    sent = {"ok": True, "event_id": EVENT_ID, "created": True, "position": 9}
    api.on("POST", "/commands/send_event", httpx.Response(200, json=sent))
    api.on("POST", "/commands/cancel_run", httpx.Response(200, json={"ok": True, "position": 10}))
    api.on("POST", "/commands/retry_run", httpx.Response(200, json={"ok": True, "position": 11}))

    assert only_json(
        ledgerflow("-o", "json", "send", "paid", "--data", '{"order": 1}', "--id", "p-1")
    ) == (sent)
    assert only_json(ledgerflow("-o", "json", "runs", "cancel", RUN_ID, "--reason", "dup")) == {
        "ok": True,
        "position": 10,
    }
    retried = ledgerflow("runs", "retry", RUN_ID)
    assert retried.exit_code == 0
    assert "resumes from its failed step" in retried.stdout

    assert api.bodies("/commands/send_event") == [
        {"name": "paid", "data": {"order": 1}, "id": "p-1"}
    ]
    assert api.bodies("/commands/cancel_run") == [{"run_id": RUN_ID, "reason": "dup"}]
    assert api.bodies("/commands/retry_run") == [{"run_id": RUN_ID}]


# -- serve and worker: their dependencies ------------------------------------------------------


def test_a_worker_with_no_nats_at_its_url_says_which_and_how_to_start_one() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    result = ledgerflow(
        "-o", "json", "--nats-url", url, "worker", "tests.integration.worker_flows:flow"
    )
    assert result.exit_code == 3
    assert f"cannot connect to NATS at {url}" in only_json(result)["error"]["message"]

    human = ledgerflow("--nats-url", url, "worker", "tests.integration.worker_flows:flow")
    assert human.exit_code == 3
    assert "make up" in human.stderr


def test_serve_with_no_database_at_its_url_says_which_and_how_to_start_one() -> None:
    port = free_port()
    result = ledgerflow("--database-url", f"postgresql://postgres@127.0.0.1:{port}/x", "serve")
    assert result.exit_code == 3
    err = flat(result.stderr)
    assert f"127.0.0.1:{port}" in err and "make up" in err


def test_the_long_running_commands_run_on_uvloop() -> None:
    """serve and worker use uvloop's event loop, a dependency (docs/performance.md, row 13)."""
    import asyncio

    import uvloop

    from ledgerflow.cli import _run_loop

    seen: list[object] = []

    async def main() -> None:
        seen.append(asyncio.get_running_loop())

    _run_loop(main())
    assert isinstance(seen[0], uvloop.Loop)
