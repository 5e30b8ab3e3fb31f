"""Private servers survive SIGKILL: committed rows and acknowledged messages are kept."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import nats
import psycopg
import pytest

from tests.support.servers import MissingBinaryError, PrivateNats, PrivatePostgres, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


_Server = TypeVar("_Server", PrivatePostgres, PrivateNats)


def _running(server_class: type[_Server], base_dir: Path) -> Iterator[_Server]:
    """Yield a started server (skip the test if it isn't installed); stopped afterwards."""
    try:
        server = server_class(base_dir)
    except MissingBinaryError as exc:
        pytest.skip(str(exc))
    with server:
        yield server
    assert not server.is_running


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[PrivatePostgres]:
    yield from _running(PrivatePostgres, tmp_path / "postgres")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[PrivateNats]:
    yield from _running(PrivateNats, tmp_path / "nats")


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535


def test_postgres_keeps_committed_rows_across_sigkill(postgres: PrivatePostgres) -> None:
    assert postgres.url == f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.execute("show fsync").fetchone() == ("on",)
        conn.execute("create table ledger (id int primary key, note text not null)")
        conn.execute("insert into ledger values (1, 'committed before the crash')")

    # A transaction still open when the server dies must not survive it.
    in_flight = psycopg.connect(postgres.url)
    try:
        in_flight.execute("insert into ledger values (2, 'never committed')")
        old_pid = postgres.pid
        postgres.kill()
        assert not postgres.is_running
        with pytest.raises(psycopg.OperationalError):
            in_flight.execute("select 1")
    finally:
        in_flight.close()

    postgres.restart()
    assert postgres.is_running
    assert postgres.pid != old_pid
    with psycopg.connect(postgres.dsn_for("postgres")) as conn:
        rows = conn.execute("select id, note from ledger order by id").fetchall()
    assert rows == [(1, "committed before the crash")]


def test_postgres_stop_and_restart_keeps_port(postgres: PrivatePostgres) -> None:
    port = postgres.port
    postgres.stop()
    assert not postgres.is_running
    postgres.restart()
    assert postgres.port == port
    with psycopg.connect(postgres.url) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_nats_keeps_acknowledged_messages_across_sigkill(nats_server: PrivateNats) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"

    async def publish() -> int:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="LEDGER", subjects=["ledger.>"])
            ack = await js.publish("ledger.entries", b"committed before the crash")
            return ack.seq
        finally:
            await nc.close()

    async def read(seq: int) -> tuple[int, bytes | None]:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            info = await js.stream_info("LEDGER")
            message = await js.get_msg("LEDGER", seq)
            return info.state.messages, message.data
        finally:
            await nc.close()

    seq = asyncio.run(publish())
    old_pid = nats_server.pid
    nats_server.kill()
    assert not nats_server.is_running

    nats_server.restart()
    assert nats_server.is_running
    assert nats_server.pid != old_pid
    assert asyncio.run(read(seq)) == (1, b"committed before the crash")


def test_nats_stop_and_restart_keeps_port(nats_server: PrivateNats) -> None:
    port = nats_server.port
    nats_server.stop()
    assert not nats_server.is_running
    nats_server.restart()
    assert nats_server.port == port

    async def roundtrip() -> bytes:
        nc = await nats.connect(nats_server.url)
        try:
            sub = await nc.subscribe("ping")
            await nc.publish("ping", b"pong")
            message = await sub.next_msg(timeout=5)
            return message.data
        finally:
            await nc.close()

    assert asyncio.run(roundtrip()) == b"pong"
