"""What the shop's web handlers do: orders are paid for in the background."""

from __future__ import annotations

import taskq

from .tasks import charge_order, send_receipt


async def place_order(order_id: int, amount_cents: int, email: str) -> taskq.Job:
    """Record an order (left out here) and charge it in the background."""
    if amount_cents == 0:  # nothing to charge: the receipt goes out at once
        return await send_receipt.enqueue(order_id=order_id, email=email)
    return await charge_order.enqueue(order_id=order_id, amount_cents=amount_cents, email=email)
