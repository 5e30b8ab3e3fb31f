"""Run the relay as an OS process of its own (tests kill it): settings from LEDGERFLOW_*."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from infrastructure.nats.relay import run
from infrastructure.settings import Settings


async def main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await run(Settings(), stop)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(main())
