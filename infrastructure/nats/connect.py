"""Connect to NATS: fail fast with the URL in the error at start-up, reconnect forever after."""

from __future__ import annotations

import logging

import nats.errors
from nats.aio.client import Client

from infrastructure.settings import Settings

log = logging.getLogger("ledgerflow.nats")

CONNECT_TIMEOUT = 2
"""Seconds to wait for the server at start-up before reporting it unreachable."""


class NatsUnavailableError(ConnectionError):
    """NATS could not be reached at the configured URL."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot connect to NATS at {url}: {reason}")
        self.url = url


async def connect(
    settings: Settings, *, name: str = "ledgerflow", timeout: int = CONNECT_TIMEOUT
) -> Client:
    """A NATS connection to ``settings.nats_url``; NatsUnavailableError if none answers."""
    url = settings.nats_url

    errors: list[Exception] = []

    async def on_error(error: Exception) -> None:
        errors.append(error)
        del errors[:-1]
        log.warning("NATS connection %s (%s): %s", name, url, error)

    async def on_disconnected() -> None:
        if not client.is_closed:  # closing calls this too
            log.warning("NATS connection %s lost (%s); reconnecting", name, url)

    async def on_reconnected() -> None:
        log.info("NATS connection %s re-established (%s)", name, url)

    client = Client()
    try:
        # nats-py retries the first connect as it would a reconnect (forever, with -1): limit
        # it so that a wrong URL is reported at once instead of hanging.
        await client.connect(
            url,
            name=name,
            connect_timeout=timeout,
            allow_reconnect=False,
            reconnect_time_wait=1,
            max_reconnect_attempts=1,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
    except (OSError, TimeoutError, nats.errors.Error) as e:
        await client.close()
        cause = errors[-1] if errors else e  # NoServersError hides why the server failed
        raise NatsUnavailableError(url, str(cause) or type(cause).__name__) from e
    # Once connected, a lost connection must be re-established, never given up on.
    client.options["allow_reconnect"] = True
    client.options["max_reconnect_attempts"] = -1
    return client
