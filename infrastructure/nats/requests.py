"""Request/reply with a short grace for 'no responders', which is safe to retry."""

from __future__ import annotations

import asyncio

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

NO_RESPONDERS_GRACE = 2.0
"""Seconds to keep retrying a request that found no subscriber.

A 'no responders' answer means the request reached nobody, so repeating it can never
apply a command twice. It happens while a service starts or restarts, and for a moment
even after a subscription was confirmed (nats-server#2876).
"""


async def request(
    nc: Client,
    subject: str,
    payload: bytes,
    timeout: float,
    *,
    grace: float = NO_RESPONDERS_GRACE,
    headers: dict[str, str] | None = None,
) -> Msg:
    """``nc.request``, retried for up to ``grace`` seconds while nobody answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    delay = 0.01
    while True:
        try:
            return await nc.request(subject, payload, timeout=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            if loop.time() + delay > deadline:
                raise
            await asyncio.sleep(delay)  # a backoff between deliveries, not a synchronisation
            delay = min(delay * 2, 0.25)
