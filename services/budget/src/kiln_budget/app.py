"""The budget's subscribers: validation is the bus's, the work is the domain's, on an intact store
(``recovery.guarded``). Also the answer to ``kiln.rpc.budget.status`` (request/reply)."""

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
    BuildContinued,
    BuildFailed,
    BuildRequested,
    BuildResumed,
    IterationCompleted,
    TopUpRequested,
    subjects,
)
from kiln_contracts.rpc import BudgetStatusReply, BudgetStatusRequest
from kiln_runtime.bus import Bus, Delivery

from . import recovery, spending
from .spending import BuildEnded, Deps

log = logging.getLogger(__name__)

STATUS_QUEUE = "budget"


def register(bus: Bus, deps: Deps, *, max_workers: int = 8) -> None:
    async def on_iteration_completed(event: IterationCompleted, _: Delivery) -> None:
        """Price the iteration's usage and charge it once; at the allowance, sleep the builds."""
        await recovery.guarded(deps, spending.iteration_completed, event)

    async def on_build_requested(event: BuildRequested, _: Delivery) -> None:
        """Count the build among its user's running builds."""
        await recovery.guarded(deps, spending.build_started, event)

    async def on_build_resumed(event: BuildResumed, _: Delivery) -> None:
        """A woken build may be put to sleep again (a new wake generation)."""
        await recovery.guarded(deps, spending.build_resumed, event)

    async def on_build_continued(event: BuildContinued, _: Delivery) -> None:
        """Count the build among its user's running builds again (a new wake generation)."""
        await recovery.guarded(deps, spending.build_continued, event)

    async def on_build_ended(event: BuildEnded, _: Delivery) -> None:
        """Remove the build from its user's running builds."""
        await recovery.guarded(deps, spending.build_ended, event)

    async def on_top_up_requested(event: TopUpRequested, _: Delivery) -> None:
        """Credit the top-up once and wake the user's builds the budget put to sleep."""
        await recovery.guarded(deps, spending.top_up, event)

    bus.consume(IterationCompleted, on_iteration_completed, max_workers=max_workers)
    bus.consume(BuildRequested, on_build_requested, max_workers=max_workers)
    bus.consume(BuildResumed, on_build_resumed, max_workers=max_workers)
    bus.consume(BuildContinued, on_build_continued, max_workers=max_workers)
    bus.consume(BuildCompleted, on_build_ended, max_workers=max_workers)
    bus.consume(BuildFailed, on_build_ended, max_workers=max_workers)
    bus.consume(BuildCancelled, on_build_ended, max_workers=max_workers)
    bus.consume(TopUpRequested, on_top_up_requested, max_workers=max_workers)


async def answer_status(deps: Deps, data: bytes) -> BudgetStatusReply:
    """A reply for every request: invalid input and failures come back as ok=False."""
    try:
        request = BudgetStatusRequest.model_validate_json(data)
    except ValidationError as err:
        return BudgetStatusReply(ok=False, error=f"invalid BudgetStatusRequest: {err}")
    try:
        await recovery.ensure_intact(deps)
        status = await spending.allowance(deps, request.user_id, unseen_tier=request.tier)
    except Exception as err:
        log.exception("budget status failed for %s", request.user_id)
        return BudgetStatusReply(
            ok=False, error=f"budget status failed: {type(err).__name__}: {err}"
        )
    return BudgetStatusReply(status=status.as_status(request.user_id))


async def serve_status(nc: Client, deps: Deps) -> Subscription:
    """Answer BudgetStatusRequests on BUDGET_STATUS (queue group "budget"), concurrently."""
    tasks: set[asyncio.Task[None]] = set()

    async def respond(msg: Msg) -> None:
        reply = await answer_status(deps, msg.data)
        if msg.reply:
            await msg.respond(reply.model_dump_json().encode())

    async def on_request(msg: Msg) -> None:
        task = asyncio.create_task(respond(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return await nc.subscribe(subjects.BUDGET_STATUS, queue=STATUS_QUEUE, cb=on_request)
