"""Create the database and the event-store tables explicitly (``ledgerflow db init``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo


@dataclass(frozen=True)
class PostgresParams:
    dbname: str
    host: str
    port: str
    user: str
    password: str

    @classmethod
    def from_url(cls, url: str) -> PostgresParams:
        params = conninfo_to_dict(url)
        return cls(
            dbname=str(params.get("dbname") or "ledgerflow"),
            host=str(params.get("host") or "127.0.0.1"),
            port=str(params.get("port") or "5432"),
            user=str(params.get("user") or "postgres"),
            password=str(params.get("password") or ""),
        )

    def url(self, dbname: str | None = None) -> str:
        auth = quote(self.user, safe="") + (
            f":{quote(self.password, safe='')}" if self.password else ""
        )
        return (
            f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname or self.dbname, safe='')}"
        )

    def conninfo(self, dbname: str | None = None) -> str:
        return make_conninfo(
            dbname=dbname or self.dbname,
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password or None,
            connect_timeout=10,
        )


def ensure_database(url: str) -> bool:
    """Create the database named in ``url`` if it is missing; True when it was created."""
    params = PostgresParams.from_url(url)
    with psycopg.connect(params.conninfo("postgres"), autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (params.dbname,)
        ).fetchone()
        if exists:
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(params.dbname)))
        except psycopg.errors.DuplicateDatabase:
            return False  # created concurrently by another `db init`
        return True


def drop_database(url: str) -> None:
    """Drop the database named in ``url`` (tests only), closing its other sessions first."""
    params = PostgresParams.from_url(url)
    with psycopg.connect(params.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(params.dbname))
        )
