"""Settings from LEDGERFLOW_* environment variables, with defaults for a developer machine."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEDGERFLOW_", extra="ignore", frozen=True)

    database_url: str = "postgresql://postgres@127.0.0.1:5432/ledgerflow"
    """``postgresql://user:password@host:port/dbname``; ``sqlite:///path/to/file.db`` for the
    embedded store of ``ledgerflow dev``; or ``memory://`` for a throw-away store."""

    nats_url: str = "nats://127.0.0.1:4222"
    subject_prefix: str = Field(
        default="ledgerflow", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"
    )
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=1, le=65535)
    api_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+")
    """Where clients (the CLI) find the API; by default ``http://{api_host}:{api_port}``."""
    db_pool_size: int = Field(default=5, ge=1, le=200)
    db_schema: str = Field(default="public", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    db_connect_timeout: int = Field(default=2, ge=1, le=60)
    """Seconds to wait for a database connection before a command answers ``unavailable``."""
    max_command_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Requests larger than this are refused with ``too_large`` (1 MiB by default)."""
    stream_max_bytes: int = Field(default=1024**3, ge=1024**2)
    """Bytes each JetStream stream keeps at most (1 GiB); the server reserves them."""
    max_command_batch: int = Field(default=200, ge=1, le=10_000)
    """At most this many commands are saved in one transaction (group commit)."""
    direct_commands: bool = False
    """Clients and workers of this process apply their commands to the event store
    themselves, instead of sending them to the ``commands`` role over NATS (ADR 19). Needs a
    PostgreSQL ``database_url`` that this process can reach."""
    eager_lease_seconds: float = Field(default=30.0, gt=0, le=86_400)
    """Seconds an eagerly started run is left to its starter's worker before the scheduler
    asks whether that worker still holds it, and again every as many seconds (ADR 17)."""

    # Telemetry (docs/observability.md)
    log_format: Literal["auto", "json", "text"] = "auto"
    """``auto``: text on a terminal, JSON lines otherwise."""
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """Serve this process's Prometheus metrics on this port (off by default; the API role
    serves them at its own /metrics anyway)."""
    metrics_host: str = "127.0.0.1"
    otel_exporter: Literal["none", "console", "otlp"] = "none"
    """Where OpenTelemetry spans go; ``otlp`` reads ``OTEL_EXPORTER_OTLP_ENDPOINT``."""

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(("postgresql://", "postgres://", "sqlite:///", "memory://")):
            raise ValueError("database_url must start with postgresql://, sqlite:/// or memory://")
        if url.startswith("sqlite:///") and not url.removeprefix("sqlite:///"):
            raise ValueError("sqlite:/// needs a file path, e.g. sqlite:///.ledgerflow/dev.db")
        return url

    @model_validator(mode="after")
    def _direct_needs_postgres(self) -> Settings:
        if self.direct_commands and not self.uses_postgres:
            raise ValueError("direct_commands needs a postgresql:// database_url")
        return self

    @property
    def api_client_url(self) -> str:
        """The API's URL for a client on this machine: ``api_url``, else host and port."""
        if self.api_url is not None:
            return self.api_url.rstrip("/")
        host = self.api_host
        if host in ("", "0.0.0.0", "::"):  # listening everywhere: this machine is one of them
            host = "127.0.0.1"
        elif ":" in host:  # an IPv6 address
            host = f"[{host}]"
        return f"http://{host}:{self.api_port}"

    def as_env(self) -> dict[str, str]:
        """These settings as the LEDGERFLOW_* variables a child process reads back."""
        return {
            f"LEDGERFLOW_{name.upper()}": str(value)
            for name, value in self.model_dump().items()
            if value is not None
        }

    @property
    def uses_postgres(self) -> bool:
        return self.database_url.startswith(("postgresql://", "postgres://"))

    @property
    def sqlite_path(self) -> str | None:
        """The embedded store's file (``sqlite:///rel/path`` or ``sqlite:////abs/path``)."""
        if self.database_url.startswith("sqlite:///"):
            return self.database_url.removeprefix("sqlite:///")
        return None
