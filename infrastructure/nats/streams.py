"""Create or update the JetStream streams ledgerflow publishes to (events and the task queue)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from infrastructure.nats.names import Names
from infrastructure.settings import Settings

log = logging.getLogger("ledgerflow.streams")

GIB = 1024**3
DAY = 24 * 3600.0
STREAM_NAME_IN_USE = 10058
"""JetStream's err_code for "stream name already in use with a different configuration"."""


@dataclass(frozen=True)
class StreamLimits:
    """How much the streams keep. The store keeps everything, so these only bound the cache."""

    events_max_age: float = 7 * DAY
    events_max_bytes: int = 1 * GIB
    tasks_max_bytes: int = 1 * GIB
    duplicate_window: float = 120.0
    """Seconds JetStream remembers a ``Nats-Msg-Id``: a republish within it is a no-op."""

    @classmethod
    def of(cls, settings: Settings) -> StreamLimits:
        """The limits ``settings`` give. JetStream reserves each stream's ``max_bytes`` out
        of the server's store, so many prefixes on one server (tests) want small ones."""
        return cls(
            events_max_bytes=settings.stream_max_bytes, tasks_max_bytes=settings.stream_max_bytes
        )


def events_config(names: Names, limits: StreamLimits) -> StreamConfig:
    # Discard old: the event stream is a bounded cache of the store; consumers that fall
    # behind its oldest message backfill from PostgreSQL.
    return StreamConfig(
        name=names.events_stream,
        description="ledgerflow domain events, published by the relay in store order",
        subjects=[names.events_wildcard],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=limits.events_max_age,
        max_bytes=limits.events_max_bytes,
        duplicate_window=limits.duplicate_window,
        num_replicas=1,
    )


def tasks_config(names: Names, limits: StreamLimits) -> StreamConfig:
    # Discard new: silently dropping the oldest pending task would lose work; refusing the
    # publish makes the publisher retry until workers catch up.
    return StreamConfig(
        name=names.tasks_stream,
        description="ledgerflow worker tasks (work queue)",
        subjects=[f"{names.prefix}.task.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_bytes=limits.tasks_max_bytes,
        duplicate_window=limits.duplicate_window,
        num_replicas=1,
    )


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or update it when it exists with another configuration."""
    try:
        await js.add_stream(config)  # idempotent when the configuration is identical
    except BadRequestError as e:
        if e.err_code != STREAM_NAME_IN_USE:
            raise
        log.info("updating the configuration of stream %s", config.name)
        await js.update_stream(config)


async def ensure_stream_exists(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream if it is missing; leave an existing one as its owner (the relay)
    configured it."""
    try:
        await js.stream_info(str(config.name))
    except NotFoundError:
        try:
            await js.add_stream(config)
        except BadRequestError as e:  # created meanwhile by someone else
            if e.err_code != STREAM_NAME_IN_USE:
                raise


async def delete_streams(settings: Settings) -> None:
    """Delete the event and task streams of ``settings.subject_prefix`` (tests, benchmarks:
    a stream left behind keeps its storage reserved on the server)."""
    import nats

    names = Names(settings.subject_prefix)
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        for stream in (names.events_stream, names.tasks_stream):
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(stream)
    finally:
        await nc.close()


async def ensure_streams(
    js: JetStreamContext, names: Names, limits: StreamLimits | None = None
) -> None:
    """Make sure the event stream and the task work-queue stream exist as configured."""
    limits = limits or StreamLimits()
    await ensure_stream(js, events_config(names, limits))
    await ensure_stream(js, tasks_config(names, limits))
