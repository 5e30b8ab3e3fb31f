"""The web UI in a real browser (Debian's chromium, headless) on each real backend: the API
role served by uvicorn, with commands, relay, scheduler, projections and a worker over the
real PostgreSQL and NATS; and ``ledgerflow dev``'s embedded engine. Each test looks at what
an operator would; screenshots go to test-artifacts/ui/<backend>/."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Coroutine, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from infrastructure import projection_runner
from infrastructure.embedded.dev import embedded
from infrastructure.http import app as api
from infrastructure.settings import Settings
from ledgerflow import Flow, RetryPolicy, RunContext
from services.clock import ManualClock
from tests.integration.durable_stack import Stack, engine_transport, stack
from tests.support import waiting
from tests.support.isolation import isolated
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

T = TypeVar("T")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
WAIT_MS = 10_000
"""The longest the browser waits for anything to appear (the pages refresh every 2 s)."""
expect.set_options(timeout=WAIT_MS)
BACKEND = "postgres"
"""The backend of the stack the tests are looking at (set by the ``served`` fixture)."""
DEADLINE = 20.0
"""Seconds the stack gets to start, and any command or condition to be met."""

# ---------------------------------------------------------------------------- workflows
flow = Flow("ui")
BROKEN: set[str] = set()  # orders whose card is declined while named here


class CardDeclinedError(Exception):
    pass


def charge(order: str) -> dict[str, str]:
    if order in BROKEN:
        raise CardDeclinedError(f"card declined for {order}")
    return {"charged": order}


@flow.workflow(retry=RetryPolicy(max_attempts=2, initial_interval=0.1))
async def checkout(ctx: RunContext, order: str) -> dict[str, str]:
    return await ctx.step("charge", charge, order)


@flow.workflow()
async def nap(ctx: RunContext, who: str) -> str:
    await ctx.sleep("nap", timedelta(hours=1))
    return f"{who} rested"


@flow.workflow()
async def tally(ctx: RunContext, who: str) -> Any:
    return await ctx.wait_for_event("counted", "tally.counted", match={"who": who})


# ------------------------------------------------------------------------ the servers
class Served:
    """The whole stack and the API in a thread with its own event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = f"http://{settings.api_host}:{settings.api_port}"
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._stack: Stack | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="ui-stack", daemon=True)

    @property
    def stack(self) -> Stack:
        assert self._stack is not None
        return self._stack

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the stack's event loop (the client lives there) and wait for it."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(DEADLINE)

    def __enter__(self) -> Served:
        self._thread.start()
        assert self.ready.wait(DEADLINE * 2), "the stack did not start"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), "the stack did not stop"
        if self.error is not None:
            raise self.error

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:
            self.error = e
        finally:
            self.ready.set()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        if self.settings.sqlite_path is not None:
            async with embedded(self.settings, [flow], concurrency=4) as dev:
                self._stack = Stack(
                    dev.client, dev.engine.store, ManualClock(), engine_transport(dev.engine)
                )
                self.ready.set()
                await self._stop.wait()
            return
        async with stack(self.settings, flow) as running:
            roles = [
                asyncio.create_task(projection_runner.run(self.settings, self._stop)),
                asyncio.create_task(api.run(self.settings, self._stop)),
            ]
            try:
                await waiting.until(self._answers(roles), "the API", DEADLINE)
                self._stack = running
                self.ready.set()
                await self._stop.wait()
            finally:
                self._stop.set()
                await asyncio.gather(*roles)

    def _answers(self, roles: list[asyncio.Task[None]]) -> Any:
        async def answers() -> bool:
            for role in roles:
                if role.done():
                    role.result()
                    raise AssertionError("a role stopped")
            try:
                async with httpx.AsyncClient(base_url=self.url) as http:
                    return (await http.get("/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        return answers


@pytest.fixture(scope="module", params=["embedded", "postgres"], ids=["embedded", "postgres+nats"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    global BACKEND
    BACKEND = request.param
    if request.param == "embedded":
        store = tmp_path_factory.mktemp("ui") / "dev.db"
        settings = Settings(database_url=f"sqlite:///{store}", api_port=free_port())
        with Served(settings) as running:
            yield running
        return
    postgres_server_url = request.getfixturevalue("postgres_server_url")
    with (
        isolated(postgres_server_url, api_host="127.0.0.1", api_port=free_port()) as settings,
        Served(settings) as running,
    ):
        yield running


@pytest.fixture(scope="module")
def browser(served: Served) -> Iterator[Browser]:
    """Chromium, started after the stack and stopped before it: Playwright's sync API runs an
    event loop in this thread, where the stack's teardown needs none to be running."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make install` installs Debian's chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser, served: Served) -> Iterator[Page]:
    context = browser.new_context(base_url=served.url, viewport={"width": 1400, "height": 900})
    context.set_default_timeout(WAIT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def shot(page: Page, name: str) -> None:
    folder = ARTIFACTS / BACKEND
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def until_status(served: Served, run_id: str, status: str) -> None:
    served.run(served.stack.until_run(run_id, lambda r: r["status"] == status, status))


def bar(page: Page, name: str, attempt: int) -> Any:
    return page.locator(f'#run .row[data-name="{name}"][data-attempt="{attempt}"]')


# -------------------------------------------------------------------------- the tests
def test_a_started_run_appears_in_the_list_without_a_reload(page: Page, served: Served) -> None:
    page.goto("/ui/runs")
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    page.evaluate("window.notReloaded = true")

    run_id = served.run(served.stack.client.start(checkout, "o-live"))
    row = page.locator(f'tr[data-run-id="{run_id}"]')
    expect(row).to_be_visible()
    expect(row.locator(".status")).to_have_text("completed")
    assert page.evaluate("window.notReloaded") is True  # htmx swapped the rows in
    shot(page, "runs-live")

    page.select_option("select[name=workflow]", "checkout")
    page.select_option("select[name=status]", "completed")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"workflow=checkout&status=completed"))
    expect(row).to_be_visible()
    page.select_option("select[name=status]", "failed")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#runs")).to_contain_text("No runs match these filters")

    row_link = f"/ui/runs/{run_id}"
    page.goto("/ui/runs")
    page.locator(f'a[href="{row_link}"]').click()
    expect(page).to_have_url(re.compile(row_link))
    expect(bar(page, "charge", 1).locator(".status")).to_have_text("completed")


def test_an_unknown_run_is_a_friendly_404_page(page: Page) -> None:
    response = page.goto("/ui/runs/6f0c1f7e-5d47-4a4e-9d6a-0d0e8b0c4a11")
    assert response is not None and response.status == 404
    expect(page.get_by_role("heading", name="Run not found")).to_be_visible()
    expect(page.get_by_role("link", name="Back to the runs")).to_be_visible()
    shot(page, "run-not-found")


def test_a_failed_step_shows_each_attempt_with_its_error_and_traceback(
    page: Page, served: Served
) -> None:
    BROKEN.add("o-fail")
    run_id = served.run(served.stack.client.start(checkout, "o-fail"))
    until_status(served, run_id, "failed")

    page.goto(f"/ui/runs/{run_id}")
    expect(page.locator("#run-status")).to_contain_text("failed")
    first, second = bar(page, "charge", 1), bar(page, "charge", 2)
    expect(first.locator(".status")).to_have_text("failed")
    expect(first).to_contain_text("retry as attempt 2 after 0.1 s")
    expect(second.locator(".status")).to_have_text("failed")
    expect(second).to_contain_text("CardDeclinedError: card declined for o-fail")
    second.locator("summary", has_text="traceback").click()
    traceback = second.locator("pre.traceback")
    expect(traceback).to_be_visible()
    expect(traceback).to_contain_text("Traceback (most recent call last)")
    expect(traceback).to_contain_text("in charge")
    expect(traceback).to_contain_text('raise CardDeclinedError(f"card declined for {order}")')

    page.locator("summary", has_text="Raw event history").click()
    history = page.locator("details.history table")
    expect(history).to_contain_text("StepFailed")
    expect(history).to_contain_text("RetryScheduled")
    expect(history).to_contain_text("RunFailed")
    shot(page, "run-failed-timeline")


def test_retry_resumes_a_failed_run_and_a_stale_retry_is_refused(
    page: Page, browser: Browser, served: Served
) -> None:
    BROKEN.add("o-retry")
    run_id = served.run(served.stack.client.start(checkout, "o-retry"))
    until_status(served, run_id, "failed")
    page.goto(f"/ui/runs/{run_id}")
    stale = page.context.new_page()  # another operator's tab, opened while it failed
    stale.goto(f"/ui/runs/{run_id}")

    BROKEN.discard("o-retry")  # the card works now
    page.get_by_role("button", name="Retry run").click()
    expect(page.locator("#run-status")).to_contain_text("completed")
    expect(bar(page, "charge", 3).locator(".status")).to_have_text("completed")
    expect(page.locator(".milestones")).to_contain_text("retried by an operator")
    expect(page.get_by_role("button", name="Retry run")).to_have_count(0)
    shot(page, "run-retried")

    events = len(served.run(served.stack.history(run_id)))
    stale.get_by_role("button", name="Retry run").click()
    refusal = stale.get_by_role("alert")
    expect(refusal).to_contain_text("retry_run was refused (invalid_state)")
    expect(refusal).to_contain_text("Nothing was changed")
    expect(stale.locator("#run-status")).to_contain_text("completed")
    assert len(served.run(served.stack.history(run_id))) == events
    shot(stale, "run-retry-refused")


def test_cancel_ends_a_sleeping_run(page: Page, served: Served) -> None:
    run_id = served.run(served.stack.client.start(nap, "ann"))
    until_status(served, run_id, "sleeping")

    page.goto(f"/ui/runs/{run_id}")
    expect(page.locator("#run-status")).to_contain_text("sleeping")
    expect(page.locator('#run .row[data-name="nap"] .status')).to_have_text("sleeping")
    page.get_by_label("reason").fill("no longer needed")
    page.get_by_role("button", name="Cancel run").click()
    expect(page.locator("#run-status")).to_contain_text("cancelled")
    expect(page.locator(".milestones")).to_contain_text("cancel requested: no longer needed")
    expect(page.locator('#run .row[data-name="nap"] .status')).to_have_text("abandoned")
    expect(page.get_by_role("button", name="Cancel run")).to_have_count(0)
    shot(page, "run-cancelled")


def test_the_workflows_page_counts_runs_by_status(page: Page, served: Served) -> None:
    waiting_run = served.run(served.stack.client.start(tally, "bob"))
    cancelled_run = served.run(served.stack.client.start(tally, "cy"))
    until_status(served, waiting_run, "waiting")
    until_status(served, cancelled_run, "waiting")
    served.run(served.stack.client.cancel(cancelled_run))

    page.goto("/ui/workflows")
    row = page.locator('tr[data-workflow="tally"]')
    expect(row.locator('[data-status="waiting"]')).to_have_text("1")
    expect(row.locator('[data-status="cancelled"]')).to_have_text("1")
    expect(row.locator('[data-status="all"]')).to_have_text("2")
    expect(page.locator('tr[data-workflow="checkout"]')).to_be_visible()
    shot(page, "workflows")

    row.locator('[data-status="waiting"] a').click()
    expect(page).to_have_url(re.compile(r"workflow=tally&status=waiting"))
    expect(page.locator(f'tr[data-run-id="{waiting_run}"]')).to_be_visible()
    expect(page.locator(f'tr[data-run-id="{cancelled_run}"]')).to_have_count(0)


def test_the_projections_page_shows_lag_and_rebuilds(page: Page, served: Served) -> None:
    run_id = served.run(served.stack.client.start(checkout, "o-rebuild"))
    until_status(served, run_id, "completed")

    page.goto("/ui/projections")
    runs = page.locator('tr[data-projection="runs"][data-state="live"]')
    for name in ("runs", "workflows", "inbound_events"):
        expect(page.locator(f'tr[data-projection="{name}"]')).to_be_visible()
    cells = [runs.locator(f'[data-field="{f}"]').inner_text() for f in ("position", "head", "lag")]
    position, head, lag = map(int, cells)
    assert head >= position > 0 and lag == head - position
    version = runs.locator("td").nth(1).inner_text()

    page.get_by_role("button", name="Rebuild runs").click()
    expect(page.locator('[data-rebuild="runs"]')).to_have_attribute("data-outcome", "done")
    expect(runs.locator("td").nth(1)).not_to_have_text(version)
    expect(runs.locator('[data-field="lag"]')).to_have_text("0")
    shot(page, "projections-rebuilt")

    page.goto("/ui/runs")  # the rebuilt read model still has every run
    expect(page.locator(f'tr[data-run-id="{run_id}"] .status')).to_have_text("completed")
