"""Order fulfilment: charge, reserve stock, ship (each compensable), then await confirmation."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel

from ledgerflow import Flow, NonRetryableError, RetryPolicy, RunContext

flow = Flow("orders")

EFFECTS: list[str] = []
"""What the fake payment, stock and shipping services were asked to do, in order."""


class Order(BaseModel):
    order_id: str
    amount_cents: int
    items: list[str]
    address: str = "1 Main Street"


class Charge(BaseModel):
    charge_id: str
    amount_cents: int


class Receipt(BaseModel):
    order_id: str
    charge_id: str
    tracking: str
    confirmed_by: str


class OrderNotConfirmedError(Exception):
    """The customer did not confirm delivery in time."""


def charge_card(order: Order) -> Charge:
    EFFECTS.append(f"charge {order.order_id} {order.amount_cents}")
    return Charge(charge_id=f"ch-{order.order_id}", amount_cents=order.amount_cents)


def refund_card(charge: Charge) -> None:
    EFFECTS.append(f"refund {charge.charge_id} {charge.amount_cents}")


async def reserve_stock(order: Order) -> list[str]:
    EFFECTS.append(f"reserve {','.join(order.items)}")
    return [f"res-{item}" for item in order.items]


async def release_stock(reservations: list[str]) -> None:
    EFFECTS.append(f"release {','.join(reservations)}")


def ship(order: Order) -> str:
    if order.address == "nowhere":
        raise NonRetryableError(f"cannot ship to {order.address!r}")
    EFFECTS.append(f"ship {order.order_id}")
    return f"track-{order.order_id}"


def cancel_shipment(tracking: str) -> None:
    EFFECTS.append(f"recall {tracking}")


@flow.workflow(retry=RetryPolicy(max_attempts=3, initial_interval=0.0))
async def fulfil_order(ctx: RunContext, order: Order) -> Receipt:
    charge = await ctx.step("charge", charge_card, order, compensate=refund_card)
    await ctx.step("reserve", reserve_stock, order, compensate=release_stock)
    tracking = await ctx.step("ship", ship, order, compensate=cancel_shipment)
    confirmation = await ctx.wait_for_event(
        "confirmation",
        "order.confirmed",
        match={"order_id": order.order_id},
        timeout=timedelta(days=3),
    )
    if confirmation is None:
        raise OrderNotConfirmedError(f"order {order.order_id} was not confirmed in time")
    await ctx.send_event("announce", "order.fulfilled", {"order_id": order.order_id})
    return Receipt(
        order_id=order.order_id,
        charge_id=charge.charge_id,
        tracking=tracking,
        confirmed_by=str(confirmation.get("by", "unknown")),
    )
