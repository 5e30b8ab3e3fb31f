"""A database and a subject prefix of a test's own, removed (streams too) when it ends."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import nats
import nats.js.errors

from infrastructure.bootstrap import init_database
from infrastructure.nats.names import Names
from infrastructure.postgres.schema import PostgresParams, drop_database
from infrastructure.settings import Settings


@contextlib.contextmanager
def isolated(postgres_server_url: str, **overrides: Any) -> Iterator[Settings]:
    """Settings naming a fresh, initialised database and an unused subject prefix.

    Tests sharing one PostgreSQL and one nats-server (or one developer's running service)
    never see each other's rows, streams or commands.
    """
    params = PostgresParams.from_url(postgres_server_url)
    own = Settings(
        database_url=params.url(f"ledgerflow_t_{uuid.uuid4().hex[:12]}"),
        subject_prefix=f"t{uuid.uuid4().hex[:8]}",
        **overrides,
    )
    init_database(own)
    try:
        yield own
    finally:
        try:
            asyncio.run(delete_streams(own))
        finally:
            drop_database(own.database_url)


async def delete_streams(settings: Settings) -> None:
    names = Names(settings.subject_prefix)
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        for stream in (names.events_stream, names.tasks_stream):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream)
    finally:
        await nc.close()
