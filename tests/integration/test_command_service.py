"""Commands over a real nats-server: every command, every error code, dedup, concurrency."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from eventsourcing.persistence import IntegrityError
from nats.aio.msg import Msg

from domain.ids import child_run_id, run_id_for
from infrastructure.bootstrap import bootstrap, init_database
from infrastructure.nats.command_service import EAGER_MAX_REQUEST_BYTES, CommandService
from infrastructure.nats.names import Names
from infrastructure.nats.requests import request
from infrastructure.postgres.schema import PostgresParams
from infrastructure.settings import Settings
from services.workflow_runs import WorkflowRuns
from tests.support.servers import PrivatePostgres

pytestmark = pytest.mark.integration

Call = Callable[..., Awaitable[dict[str, Any]]]


@asynccontextmanager
async def serving(app: WorkflowRuns, settings: Settings, **options: Any) -> AsyncIterator[Call]:
    """A command service on a private subject prefix, and a function that sends requests."""
    names = Names(f"t{uuid.uuid4().hex[:8]}")
    server, client = await nats.connect(settings.nats_url), await nats.connect(settings.nats_url)
    service = CommandService(app, names, **options)
    await service.start(server)

    async def call(
        name: str,
        body: Any = None,
        raw: bytes | None = None,
        *,
        answer: bool = True,
        timeout: float = 30,
    ) -> dict[str, Any]:
        """Send a request; ``answer=False`` publishes it with no reply subject (on the
        same connection, so it reaches the service before any later request)."""
        payload = raw if raw is not None else json.dumps(body or {}).encode()
        if not answer:
            await client.publish(names.command(name), payload)
            return {}
        reply = await request(client, names.command(name), payload, timeout)
        result: dict[str, Any] = json.loads(reply.data)
        return result

    try:
        yield call
    finally:
        await service.stop()
        await client.close()
        await server.close()


def test_every_command_answers_over_nats(database_settings: Settings) -> None:
    async def scenario(call: Call) -> None:
        assert (await call("register_workflow", {"name": "orders", "triggers": ["o.placed"]}))["ok"]
        started = await call("start_run", {"workflow": "orders", "input": {"n": 1}, "key": "k1"})
        assert started["ok"] and started["created"] is True and started["position"] > 0
        run = started["run_id"]
        assert run == str(run_id_for("orders", "k1"))

        async def ok(command: str, **body: Any) -> dict[str, Any]:
            reply = await call(command, {"run_id": run, **body})
            assert reply["ok"], (command, reply)
            return reply

        await ok("start_step", step="charge", attempt=1)
        await ok("fail_step", step="charge", attempt=1, error={"type": "Timeout", "message": "x"})
        await ok("start_step", step="charge", attempt=2)
        await ok("complete_step", step="charge", attempt=2, output={"id": 1}, compensable=True)
        await ok("start_sleep", name="nap", seconds=60)
        await ok("fire_timer", name="nap")
        await ok("start_wait", name="ship", event_name="o.shipped", match={"n": 1})
        sent = await call("send_event", {"name": "o.shipped", "data": {"n": 1}, "id": "e1"})
        assert sent["ok"] and sent["created"] is True
        await ok("deliver_event", name="ship", event_id=sent["event_id"])
        await ok("start_wait", name="late", event_name="o.late", timeout_seconds=5)
        await ok("time_out_wait", name="late")
        await ok("start_child", name="invoice", workflow="orders", input={"child": True})
        child = str(child_run_id(uuid.UUID(run), "invoice"))
        assert (await call("complete_run", {"run_id": child, "output": 7}))["ok"]
        await ok("resolve_child", name="invoice")
        emitted = await ok("emit_event", name="announce", event_name="o.done", data={"n": 1})
        assert emitted["created"] is True
        await ok("complete_run", output={"done": True})

        other = (await call("start_run", {"workflow": "orders", "key": "k2"}))["run_id"]
        steps: list[tuple[str, dict[str, Any]]] = [
            ("start_step", {"step": "a", "attempt": 1}),
            ("complete_step", {"step": "a", "attempt": 1, "compensable": True}),
            ("fail_run", {"error": {"type": "Boom", "message": "no"}}),
            ("compensate_step", {"step": "a"}),
            ("retry_run", {}),
            ("cancel_run", {"reason": "changed my mind"}),
        ]
        for name, body in steps:
            assert (await call(name, {"run_id": other, **body}))["ok"], name
        third = (await call("start_run", {"workflow": "orders", "key": "k3"}))["run_id"]
        assert (await call("time_out_run", {"run_id": third}))["ok"]

    app = bootstrap(database_settings)
    try:
        asyncio.run(_with(app, database_settings, scenario))
        assert app.get_run(run_id_for("orders", "k1")).status == "completed"
        assert app.get_run(run_id_for("orders", "k2")).status == "cancelled"
        assert app.get_run(run_id_for("orders", "k3")).status == "failed"
    finally:
        app.close()


def test_each_kind_of_bad_request_gets_its_error_code_and_appends_nothing(
    database_settings: Settings,
) -> None:
    async def scenario(call: Call) -> None:
        head = app.recorder.max_notification_id()
        missing = str(uuid.uuid4())
        cases: list[tuple[str, Any, bytes | None, str]] = [
            ("start_run", None, b"{not json", "invalid_command"),
            ("start_run", None, b"[1, 2]", "invalid_command"),
            ("start_run", {"workflow": "x", "surprise": 1}, None, "invalid_command"),
            ("start_run", {"workflow": "bad name!"}, None, "invalid_command"),
            ("launch_rocket", {}, None, "invalid_command"),
            ("start_run", {"workflow": "nobody"}, None, "unknown_workflow"),
            ("cancel_run", {"run_id": missing}, None, "run_not_found"),
            ("start_run", {"workflow": "big", "input": "x" * 5000}, None, "too_large"),
        ]
        for name, body, raw, code in cases:
            reply = await call(name, body, raw)
            assert reply["ok"] is False and reply["error"]["code"] == code, (name, reply)
            assert reply["error"]["message"]
        invalid = await call("start_run", {"workflow": "x", "surprise": 1})
        assert invalid["error"]["details"][0]["loc"] == ["surprise"]
        run = (await call("start_run", {"workflow": "orders"}))["run_id"]
        await call("complete_run", {"run_id": run})
        head = app.recorder.max_notification_id()
        late = await call("start_step", {"run_id": run, "step": "s", "attempt": 1})
        assert late["error"]["code"] == "invalid_state"
        assert app.recorder.max_notification_id() == head

    app = bootstrap(database_settings)
    try:
        asyncio.run(_with(app, database_settings, _registered(scenario), max_bytes=4096))
    finally:
        app.close()


def test_a_duplicate_command_id_over_nats_gets_the_first_reply(database_settings: Settings) -> None:
    async def scenario(call: Call) -> None:
        request = {"workflow": "orders", "command_id": f"c-{uuid.uuid4()}"}
        first = await call("start_run", request)
        head = app.recorder.max_notification_id()
        assert await call("start_run", request) == first
        assert app.recorder.max_notification_id() == head

    app = bootstrap(database_settings)
    try:
        asyncio.run(_with(app, database_settings, _registered(scenario)))
    finally:
        app.close()


def test_200_concurrent_starts_with_one_key_make_exactly_one_run(
    database_settings: Settings,
) -> None:
    key = f"cart-{uuid.uuid4().hex[:6]}"

    async def scenario(call: Call) -> None:
        replies = await asyncio.gather(
            *(call("start_run", {"workflow": "orders", "key": key}) for _ in range(200))
        )
        assert all(r["ok"] for r in replies)
        assert {r["run_id"] for r in replies} == {str(run_id_for("orders", key))}
        assert sum(r["created"] for r in replies) == 1

    app = bootstrap(database_settings)
    try:
        asyncio.run(_with(app, database_settings, _registered(scenario)))
        # One start: RunStarted and its TaskDispatched (ADR 13), nothing more.
        assert app.get_run(run_id_for("orders", key)).version == 2
    finally:
        app.close()


class _AlwaysConflicting(WorkflowRuns):
    def save(self, *objs: Any, **kwargs: Any) -> Any:
        raise IntegrityError("another writer always wins (fault injected)")


def test_a_command_that_keeps_conflicting_answers_conflict(database_settings: Settings) -> None:
    async def scenario(call: Call) -> None:
        reply = await call("register_workflow", {"name": "contended"})
        assert reply["error"]["code"] == "conflict"

    app = bootstrap(database_settings)
    faulty = _AlwaysConflicting(env=app.env)
    try:
        asyncio.run(_with(faulty, database_settings, scenario))
    finally:
        faulty.close()
        app.close()


def test_commands_answer_unavailable_while_postgres_is_down(
    tmp_path: Path, database_settings: Settings
) -> None:
    with PrivatePostgres(tmp_path) as postgres:
        settings = Settings(
            database_url=postgres.dsn_for("ledgerflow"), nats_url=database_settings.nats_url
        )
        init_database(settings)
        app = bootstrap(settings)
        try:

            async def scenario(call: Call) -> None:
                assert (await call("register_workflow", {"name": "orders"}))["ok"]
                postgres.stop()
                reply = await call("start_run", {"workflow": "orders"})
                assert reply["error"]["code"] == "unavailable", reply
                postgres.start()
                deadline = asyncio.get_running_loop().time() + 30
                while not (await call("start_run", {"workflow": "orders"}))["ok"]:
                    assert asyncio.get_running_loop().time() < deadline, "never recovered"
                    await asyncio.sleep(0.2)  # the pool reconnects in the background

            asyncio.run(_with(app, settings, scenario))
        finally:
            app.close()
    assert PostgresParams.from_url(settings.database_url).dbname == "ledgerflow"


async def _with(
    app: WorkflowRuns, settings: Settings, scenario: Callable[[Call], Awaitable[None]], **kw: Any
) -> None:
    async with serving(app, settings, **kw) as call:
        await scenario(call)


def _registered(scenario: Callable[[Call], Awaitable[None]]) -> Callable[[Call], Awaitable[None]]:
    async def wrapped(call: Call) -> None:
        assert (await call("register_workflow", {"name": "orders"}))["ok"]
        await scenario(call)

    return wrapped


def test_a_request_that_finds_no_responder_is_retried_briefly_then_fails(
    database_settings: Settings,
) -> None:
    async def scenario() -> None:
        subject = f"t{uuid.uuid4().hex[:8]}.cmd.start_run"
        async with await nats.connect(database_settings.nats_url) as nc:
            with pytest.raises(nats.errors.NoRespondersError):
                await request(nc, subject, b"{}", 1, grace=0.2)

            async def answer_later() -> None:
                await asyncio.sleep(0.3)  # a service that starts while the request waits

                async def respond(msg: Msg) -> None:
                    await msg.respond(b"late")

                sub = await nc.subscribe(subject, cb=respond)
                await nc.flush()
                await asyncio.sleep(2)
                await sub.unsubscribe()

            later = asyncio.create_task(answer_later())
            reply = await request(nc, subject, b"{}", 1, grace=2)
            assert reply.data == b"late"
            await later

    asyncio.run(scenario())


class _Broken(WorkflowRuns):
    def execute(self, commands: Any) -> Any:
        raise RuntimeError("a bug (fault injected)")


def test_an_unexpected_failure_answers_internal_and_the_service_keeps_serving(
    database_settings: Settings,
) -> None:
    async def scenario(call: Call) -> None:
        for _ in range(2):  # the batch loop survives the first failure
            reply = await call("register_workflow", {"name": "broken"})
            assert reply["error"]["code"] == "internal", reply
            assert "nothing was applied" in reply["error"]["message"]

    app = bootstrap(database_settings)
    broken = _Broken(env=app.env)
    try:
        head = app.recorder.max_notification_id()
        asyncio.run(_with(broken, database_settings, scenario))
        assert app.recorder.max_notification_id() == head
    finally:
        broken.close()
        app.close()


def test_a_run_end_sent_behind_its_last_completion_waits_for_it_over_nats(
    database_settings: Settings,
) -> None:
    """ADR 16: ``complete_run`` naming a step in flight is refused (``steps_pending``) and
    appends nothing; sent right behind the step's completion, it follows it."""

    runs: list[str] = []

    async def scenario(call: Call) -> None:
        run = (await call("start_run", {"workflow": "orders"}))["run_id"]
        runs.append(run)
        assert (await call("start_step", {"run_id": run, "step": "a", "attempt": 1}))["ok"]
        early = await call("complete_run", {"run_id": run, "output": 1, "after_steps": ["a"]})
        assert early["ok"] is False
        assert early["error"]["code"] == "invalid_state"
        assert early["error"]["details"] == [{"reason": "steps_pending"}]
        completion = {"run_id": run, "step": "a", "attempt": 1, "output": 2}
        await call("complete_step", completion, answer=False)  # sent, not waited for
        end = await call("complete_run", {"run_id": run, "output": 3, "after_steps": ["a"]})
        assert end["ok"], end

    app = bootstrap(database_settings)
    try:
        asyncio.run(_with(app, database_settings, _registered(scenario)))
        run = app.get_run(uuid.UUID(runs[0]))
        assert (run.status, run.output) == ("completed", 3)
        assert [type(e).__name__ for e in app.events.get(run.id)][-2:] == [
            "StepCompleted",
            "RunCompleted",
        ]
    finally:
        app.close()


def test_an_eager_start_replies_with_its_run_unless_the_request_is_too_large(
    database_settings: Settings,
) -> None:
    """The reply repeats the input: a start past EAGER_MAX_REQUEST_BYTES is a plain one."""

    async def scenario(call: Call) -> None:
        assert (await call("register_workflow", {"name": "orders"}))["ok"]
        small = await call("start_run", {"workflow": "orders", "input": {"n": 1}, "eager": True})
        assert small["run"]["run_id"] == small["run_id"] and small["run"]["dispatch"] == 1
        big = {"blob": "x" * (EAGER_MAX_REQUEST_BYTES + 1)}
        large = await call("start_run", {"workflow": "orders", "input": big, "eager": True})
        assert large["ok"] and "run" not in large
        loaded = await call("load_run", {"run_id": large["run_id"]})
        assert loaded["run"]["dispatch"] == 1  # handed to its queue, as a plain start is

    app = bootstrap(database_settings)
    try:
        asyncio.run(_with(app, database_settings, scenario))
    finally:
        app.close()


def test_a_reply_too_large_for_nats_is_lost_alone_and_the_service_keeps_serving(
    database_settings: Settings,
) -> None:
    """A run whose input nearly fills a request has a snapshot past NATS's payload limit:
    its ``load_run`` gets no answer, and every other request still does."""

    async def scenario(call: Call) -> None:
        assert (await call("register_workflow", {"name": "orders"}))["ok"]
        big = {"blob": "x" * (1024 * 1024 - 200)}
        started = await call("start_run", {"workflow": "orders", "input": big})
        assert started["ok"], started
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await call("load_run", {"run_id": started["run_id"]}, timeout=2)
        assert (await call("register_workflow", {"name": "still"}, timeout=5))["ok"]

    app = bootstrap(database_settings)
    try:
        # Bounded: a batch loop that died would leave the service's stop waiting forever.
        asyncio.run(asyncio.wait_for(_with(app, database_settings, scenario), 60))
    finally:
        app.close()
