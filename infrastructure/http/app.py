"""The ``api`` role: the FastAPI app of read models and commands, and its uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import nats.errors
import psycopg
import uvicorn
from fastapi import FastAPI
from nats.aio.client import Client
from psycopg_pool import ConnectionPool

import ledgerflow
from infrastructure.bootstrap import bootstrap
from infrastructure.http.commands import NatsGateway
from infrastructure.http.context import (
    ApiContext,
    CommandGateway,
    Limits,
    Queries,
    Rebuilder,
)
from infrastructure.http.errors import install_error_handlers
from infrastructure.http.freshness import PositionWatcher
from infrastructure.http.observe import ObserveRequests
from infrastructure.http.rebuilder import PostgresRebuilder
from infrastructure.http.routes import router
from infrastructure.http.ui import install_ui
from infrastructure.nats.connect import connect
from infrastructure.nats.names import Names
from infrastructure.postgres.queries import ReadModelQueries
from infrastructure.postgres.read_models import conninfo
from infrastructure.settings import Settings
from infrastructure.telemetry.asgi import TraceRequests
from services.workflow_runs import WorkflowRuns

log = logging.getLogger("ledgerflow.api")

SHUTDOWN_GRACE = 5
"""Seconds in-flight requests get to finish once the role is asked to stop."""


def create_app(
    settings: Settings,
    *,
    queries: Queries | None = None,
    store: WorkflowRuns | None = None,
    nats_client: Client | None = None,
    commands: CommandGateway | None = None,
    rebuilder: Rebuilder | None = None,
    **limits: float,
) -> FastAPI:
    """The API app. Its lifespan opens whatever is not passed in (a query pool, the event
    store, a NATS connection) and closes what it opened; what is passed in stays the
    caller's. ``commands`` replaces NATS and ``rebuilder`` the PostgreSQL rebuilds (the
    embedded engine of ``ledgerflow dev`` passes both).
    ``limits`` are :class:`Limits` fields (``max_wait=0.2``...)."""
    bounds = Limits(**limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            ctx = await _open(
                stack, settings, bounds, queries, store, nats_client, commands, rebuilder
            )
            app.state.ledgerflow = ctx
            log.info("API ready (schema %s, nats %s)", settings.db_schema, settings.nats_url)
            yield

    app = FastAPI(
        title="ledgerflow",
        version=ledgerflow.__version__,
        summary="Read models, run history and commands of ledgerflow's durable workflows",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(ObserveRequests)
    app.add_middleware(TraceRequests)  # outermost: its span covers the whole request
    app.include_router(router)
    install_ui(app)
    app.openapi = _openapi_with_error_bodies(app)  # type: ignore[method-assign]
    return app


async def _open(
    stack: contextlib.AsyncExitStack,
    settings: Settings,
    limits: Limits,
    queries: Queries | None,
    store: WorkflowRuns | None,
    nats_client: Client | None,
    commands: CommandGateway | None,
    rebuilder: Rebuilder | None,
) -> ApiContext:
    if queries is None:
        queries = await asyncio.to_thread(open_queries, settings, limits.db_timeout)
        stack.push_async_callback(asyncio.to_thread, queries.close)
    if store is None:
        store = await asyncio.to_thread(bootstrap, settings)
        stack.push_async_callback(asyncio.to_thread, store.close)
    if commands is None:
        if nats_client is None:
            nats_client = await connect(settings, name="ledgerflow-api")
            stack.push_async_callback(_close_nats, nats_client)
        commands = NatsGateway(
            nats_client,
            Names(settings.subject_prefix),
            max_bytes=settings.max_command_bytes,
            timeout=limits.command_timeout,
        )
    read = queries.projection_positions
    watcher = PositionWatcher(lambda: asyncio.to_thread(read), interval=limits.poll_interval)
    stack.push_async_callback(watcher.close)
    if rebuilder is None and settings.uses_postgres:
        postgres = PostgresRebuilder(settings)
        stack.push_async_callback(postgres.close)
        rebuilder = postgres
    return ApiContext(
        settings=settings,
        limits=limits,
        queries=queries,
        store=store,
        commands=commands,
        watcher=watcher,
        rebuilder=rebuilder,
    )


def open_queries(settings: Settings, timeout: float = 5.0) -> ReadModelQueries:
    """Queries on a pool of their own whose requests give up after ``timeout`` seconds
    without a connection: a dead database answers 503 quickly, not after 30 s."""
    pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
        conninfo(settings),
        min_size=1,
        max_size=settings.db_pool_size,
        kwargs={"autocommit": True, "connect_timeout": settings.db_connect_timeout},
        timeout=timeout,
        open=True,
        name="ledgerflow-api",
    )
    return _OwningQueries(pool, settings.db_schema)


class _OwningQueries(ReadModelQueries):
    """ReadModelQueries that close the pool they were given."""

    def close(self) -> None:
        self._pool.close()


async def _close_nats(nc: Client) -> None:
    with contextlib.suppress(nats.errors.Error):
        await nc.drain()  # replies in flight are delivered before the connection goes
    if not nc.is_closed:
        await nc.close()


def _openapi_with_error_bodies(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI documents a 422 HTTPValidationError on every route with parameters; this API
    answers 400 with its own error body instead, so document that."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = plain()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses.setdefault(
                        "400",
                        {
                            "description": "Invalid request",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/ErrorBody"}
                                }
                            },
                        },
                    )
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
        return schema

    return openapi


# ------------------------------------------------------------------------------- serving
class _Server(uvicorn.Server):
    """uvicorn without signal handlers: ``ledgerflow serve`` owns them and sets ``stop``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    """Bind here, so that a port in use is an OSError naming it (uvicorn would exit)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {reason}") from None


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """The ``api`` role: serve on ``settings.api_host:api_port`` until ``stop`` is set."""
    async with contextlib.AsyncExitStack() as stack:
        # Opened here rather than in the lifespan, so that a dependency that cannot be
        # reached fails the role with its own error (uvicorn would only exit).
        queries = await asyncio.to_thread(open_queries, settings)
        stack.push_async_callback(asyncio.to_thread, queries.close)
        store = await asyncio.to_thread(bootstrap, settings)
        stack.push_async_callback(asyncio.to_thread, store.close)
        nc = await connect(settings, name="ledgerflow-api")
        stack.push_async_callback(_close_nats, nc)
        app = create_app(settings, queries=queries, store=store, nats_client=nc)
        await serve_app(app, settings.api_host, settings.api_port, stop)
    log.info("API stopped")


async def serve_app(app: FastAPI, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve ``app`` on ``host:port`` until ``stop`` is set (then let requests finish)."""
    sock = await asyncio.to_thread(_listen, host, port)
    try:
        config = uvicorn.Config(
            app,
            log_config=None,  # logging is the serve command's business
            lifespan="on",
            timeout_graceful_shutdown=SHUTDOWN_GRACE,
        )
        server = _Server(config)
        serving = asyncio.create_task(_serve(server, sock), name="uvicorn")
        stopping = asyncio.create_task(stop.wait(), name="api-stop")
        log.info("API listening on http://%s:%d", host, port)
        try:
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            server.should_exit = True
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopping
            await serving
        if not stop.is_set():
            raise RuntimeError("the API server stopped on its own")
    finally:
        sock.close()


async def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit as e:  # uvicorn exits on a failed startup: don't take the loop down
        raise RuntimeError(f"the API server failed to start (exit status {e.code})") from None
