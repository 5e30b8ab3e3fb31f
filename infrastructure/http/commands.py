"""Commands over HTTP: check a request as the command service would, then forward it over NATS."""

from __future__ import annotations

import asyncio
import json
import logging

import nats.errors
from fastapi import Request
from nats.aio.client import Client

from domain.values import JSON
from infrastructure.http.errors import ApiError
from infrastructure.nats.command_service import CommandError, parse_command
from infrastructure.nats.names import Names
from infrastructure.nats.requests import request
from ledgerflow._telemetry import outgoing_headers

log = logging.getLogger("ledgerflow.api")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body; ``too_large`` as soon as it exceeds ``max_bytes`` (never buffered)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ApiError("too_large", f"request is {int(declared)} bytes; the limit is {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:  # chunked, or a lying Content-Length
            raise ApiError("too_large", f"request exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class NatsGateway:
    """Commands forwarded to the command service over NATS (``serve``'s API role)."""

    dependency = "nats"

    def __init__(self, nc: Client, names: Names, *, max_bytes: int, timeout: float) -> None:
        self.nc = nc
        self.names = names
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def send(self, name: str, payload: bytes) -> dict[str, JSON]:
        return await forward(
            self.nc, self.names, name, payload, max_bytes=self.max_bytes, timeout=self.timeout
        )

    async def check(self, timeout: float) -> None:
        if not self.nc.is_connected:
            raise ConnectionError("not connected")
        await asyncio.wait_for(self.nc.flush(), timeout)


async def forward(
    nc: Client, names: Names, name: str, payload: bytes, *, max_bytes: int, timeout: float
) -> dict[str, JSON]:
    """The command service's reply to command ``name`` (an error body when it refused it).

    The request is checked here first, with the service's own parser, so that a malformed
    one costs no round trip and an unknown name never becomes a NATS subject.
    """
    try:
        parse_command(name, payload, max_bytes)
    except CommandError as e:
        raise ApiError(e.code, e.message, e.details) from None
    subject = names.command(name)
    try:
        reply = await request(nc, subject, payload, timeout, headers=outgoing_headers())
    except nats.errors.NoRespondersError:
        raise ApiError(
            "unavailable", f"no command service answers on {subject}; retry later"
        ) from None
    except nats.errors.TimeoutError:
        # It may have been applied: a retry with the same command_id is answered, not redone.
        raise ApiError(
            "unavailable",
            f"no reply within {timeout:g} s; the command may have been applied: "
            "retry with the same command_id",
        ) from None
    except nats.errors.Error as e:
        log.warning("cannot forward %s: %s", name, e)
        raise ApiError("unavailable", f"NATS is unavailable: {e}; retry") from None
    try:
        body = json.loads(reply.data)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        log.error("unreadable reply to %s: %r", name, reply.data[:200])
        raise ApiError("internal", "the command service sent an unreadable reply")
    return body
