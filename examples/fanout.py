"""Fan-out/fan-in: price every item in parallel steps (asyncio.gather), then total them."""

from __future__ import annotations

import asyncio

from ledgerflow import Flow, RunContext

flow = Flow("fanout")

PRICES = {"apple": 30, "pear": 45, "plum": 20, "fig": 80}


async def price_of(item: str) -> int:
    await asyncio.sleep(0.05)  # a slow pricing service: parallel steps overlap
    return PRICES.get(item, 100)


def total_of(prices: list[int]) -> int:
    return sum(prices)


@flow.workflow()
async def price_basket(ctx: RunContext, items: list[str]) -> dict[str, int]:
    prices = await asyncio.gather(
        *(ctx.step(f"price-{i}-{item}", price_of, item) for i, item in enumerate(items))
    )
    total = await ctx.step("total", total_of, list(prices))
    return {"items": len(items), "total": total}
