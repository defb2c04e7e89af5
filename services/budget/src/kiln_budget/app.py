"""The budget's subscribers (validation is the bus's, the work is the domain's), and the top-ups
it answers over request/reply."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from kiln_contracts import (
    BuildCancelled,
    BuildCompleted,
    BuildFailed,
    BuildRejected,
    BuildRequested,
    BuildResumed,
    IterationCompleted,
    subjects,
)
from kiln_contracts.rpc import TopUpReply, TopUpRequest
from kiln_runtime.bus import Bus, Delivery

from . import spending
from .spending import BuildEnded, Deps

log = logging.getLogger(__name__)

TOP_UP_QUEUE = "budget"


def register(bus: Bus, deps: Deps, *, max_workers: int = 8) -> None:
    async def on_iteration_completed(event: IterationCompleted, _: Delivery) -> None:
        """Price the iteration's usage and charge it once; at the allowance, close the user's
        gate and sleep the builds."""
        await spending.iteration_completed(deps, event)

    async def on_build_requested(event: BuildRequested, _: Delivery) -> None:
        """Count the build among its user's running builds."""
        await spending.build_started(deps, event)

    async def on_build_resumed(event: BuildResumed, _: Delivery) -> None:
        """A woken build may be put to sleep again (a new wake generation)."""
        await spending.build_resumed(deps, event)

    async def on_build_ended(event: BuildEnded, _: Delivery) -> None:
        """Remove the build from its user's running builds."""
        await spending.build_ended(deps, event)

    bus.consume(IterationCompleted, on_iteration_completed, max_workers=max_workers)
    bus.consume(BuildRequested, on_build_requested, max_workers=max_workers)
    bus.consume(BuildResumed, on_build_resumed, max_workers=max_workers)
    bus.consume(BuildCompleted, on_build_ended, max_workers=max_workers)
    bus.consume(BuildFailed, on_build_ended, max_workers=max_workers)
    bus.consume(BuildCancelled, on_build_ended, max_workers=max_workers)
    bus.consume(BuildRejected, on_build_ended, max_workers=max_workers)


async def answer_top_up(deps: Deps, data: bytes) -> TopUpReply:
    """A reply for every request: invalid input and failures come back as ok=False (the caller
    retries with the same topup_id: it is credited once)."""
    try:
        request = TopUpRequest.model_validate_json(data)
    except ValidationError as err:
        return TopUpReply(ok=False, error=f"invalid TopUpRequest: {err}")
    try:
        woken = await spending.top_up(
            deps, request.user_id, request.topup_id, request.amount_micro_usd
        )
    except Exception as err:
        log.exception("top-up failed for %s", request.user_id)
        return TopUpReply(ok=False, error=f"top-up failed: {type(err).__name__}: {err}")
    return TopUpReply(woken=sorted(woken))


async def serve_top_ups(nc: Client, deps: Deps) -> Subscription:
    """Answer TopUpRequests on BUDGET_TOP_UP (queue group "budget": one replica each)."""
    tasks: set[asyncio.Task[None]] = set()

    async def respond(msg: Msg) -> None:
        reply = await answer_top_up(deps, msg.data)
        if msg.reply:
            await msg.respond(reply.model_dump_json().encode())

    async def on_request(msg: Msg) -> None:
        task = asyncio.create_task(respond(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return await nc.subscribe(subjects.BUDGET_TOP_UP, queue=TOP_UP_QUEUE, cb=on_request)
