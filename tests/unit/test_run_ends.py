"""Waiting for run ends over NATS: one subscription per connection, each end to its waiters."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.msg import Msg

from infrastructure.nats.names import HEADER_ORIGINATOR_ID
from ledgerflow._transport import RUN_ENDS, Transport

Callback = Callable[[Msg], Awaitable[None]]


class FakeNats:
    """Just what the run-end subscriptions use of a NATS connection."""

    def __init__(self) -> None:
        self.subscribed: dict[str, Callback] = {}
        self.subscribe_calls = 0
        self.unsubscribed: list[str] = []
        self.is_closed = False

    async def subscribe(self, subject: str, cb: Callback) -> Any:
        self.subscribe_calls += 1
        self.subscribed[subject] = cb
        fake = self

        class Subscription:
            async def unsubscribe(self) -> None:
                fake.unsubscribed.append(subject)
                del fake.subscribed[subject]

        return Subscription()

    async def flush(self) -> None:
        pass

    async def drain(self) -> None:
        self.is_closed = True

    async def publish_end(self, kind: str, run_id: str, data: dict[str, Any]) -> None:
        subject = f"p.evt.WorkflowRun.{kind}"
        body = json.dumps({"type": kind, "data": data}).encode()
        msg = Msg(self, subject, "", body, {HEADER_ORIGINATOR_ID: run_id})  # type: ignore[arg-type]
        if subject in self.subscribed:
            await self.subscribed[subject](msg)


def test_many_waiters_share_one_subscription_and_each_hears_only_its_run() -> None:
    async def scenario() -> None:
        nc = FakeNats()
        transport = Transport(nc, "p")  # type: ignore[arg-type]
        heard: dict[str, Any] = {}

        async def wait(run_id: str) -> None:
            async with transport.run_ends(run_id) as ended:
                await ended.wait()
                heard[run_id] = ended.output if ended.completed else "ended"

        waiters = [asyncio.create_task(wait(f"run-{n}")) for n in range(50)]
        while len(nc.subscribed) < len(RUN_ENDS) or not all(
            f"run-{n}" in transport._ends._waiters for n in range(50)
        ):
            await asyncio.sleep(0)
        await nc.publish_end("RunCompleted", "run-7", {"output": {"sum": 6}})
        await nc.publish_end("RunFailed", "run-8", {"error": {"type": "E", "message": ""}})
        await nc.publish_end("RunCompleted", "someone-else", {"output": 1})
        await asyncio.wait_for(asyncio.gather(waiters[7], waiters[8]), 5)
        assert heard == {"run-7": {"sum": 6}, "run-8": "ended"}
        assert nc.subscribe_calls == len(RUN_ENDS)  # not 50 x 4
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        async with transport.run_ends("later"):
            pass
        assert nc.subscribe_calls == len(RUN_ENDS)  # still subscribed: no churn
        assert nc.unsubscribed == []
        await transport.close()

    asyncio.run(scenario())
