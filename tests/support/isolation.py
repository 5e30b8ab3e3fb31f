"""A database and a subject prefix of a test's own, removed (streams too) when it ends."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

from infrastructure.bootstrap import init_database
from infrastructure.nats.streams import delete_streams
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
        stream_max_bytes=64 * 1024**2,  # JetStream reserves it: keep many tests' streams small
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
