"""The webhooks service's entrypoints: the durable consumer of build events (queue their
deliveries) and the gateway's requests on ``kiln.rpc.webhooks.*`` (the endpoints)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from pydantic import BaseModel

from kiln_contracts import Envelope
from kiln_contracts import webhooks as wh
from kiln_runtime.bus import Bus, Delivery
from kiln_runtime.retry import retry
from kiln_runtime.rpc import Responder

from . import deliveries, metrics
from .endpoints import Endpoints
from .ports import Store

QUEUE = "webhooks"
TRANSIENT_DB = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
)


def register(
    bus: Bus, store: Store, *, durable: str, wake: Callable[[], None] = lambda: None
) -> None:
    async def on_event(event: Envelope, delivery: Delivery) -> None:
        """Queue the event for every endpoint of its user that asked for its type."""
        # Retried here, in stream order, rather than redelivered behind the build's later events.
        added = await retry(
            lambda: deliveries.accept(store, event, delivery.stream_seq),
            attempts=5,
            retry_on=TRANSIENT_DB,
            base=0.2,
            cap=2.0,
        )
        if added:
            metrics.QUEUED.inc(added)
            wake()

    # One consumer of the kinds endpoints may want, one at a time: deliveries are queued in
    # stream order.
    bus.consume_kinds(list(wh.EVENT_TYPES.values()), on_event, durable=durable, max_workers=1)


def responders(endpoints: Endpoints) -> list[Responder[Any, wh.WebhookReply]]:
    """One responder per operation (queue group "webhooks")."""
    ops: list[tuple[str, type[BaseModel], Callable[[Any], Awaitable[wh.WebhookReply]]]] = [
        (wh.CREATE, wh.WebhookCreateRequest, endpoints.create),
        (wh.LIST, wh.WebhookListRequest, endpoints.list),
        (wh.GET, wh.WebhookRef, endpoints.get),
        (wh.UPDATE, wh.WebhookUpdateRequest, endpoints.update),
        (wh.DELETE, wh.WebhookRef, endpoints.delete),
        (wh.ROTATE, wh.WebhookRotateRequest, endpoints.rotate),
        (wh.DELIVERIES, wh.WebhookDeliveriesRequest, endpoints.deliveries),
        (wh.REDELIVER, wh.WebhookRedeliverRequest, endpoints.redeliver),
    ]
    return [
        Responder(subject, QUEUE, model, wh.WebhookReply, handle, failure=subject.rsplit(".")[-1])
        for subject, model, handle in ops
    ]
