"""The budget's subscribers: validation is the bus's, the work is the domain's, on an intact store
(``recovery.guarded``). Also the answer to ``kiln.rpc.budget.status`` (request/reply)."""

from __future__ import annotations

import logging
from functools import partial

from kiln_contracts import (
    BuildCancelled,
    BuildCompleted,
    BuildContinued,
    BuildFailed,
    BuildRejected,
    BuildRequested,
    BuildResumed,
    IterationCompleted,
    TopUpRequested,
    subjects,
)
from kiln_contracts.rpc import BudgetStatusReply, BudgetStatusRequest
from kiln_runtime.bus import Bus, Delivery
from kiln_runtime.rpc import Responder

from . import allowance, recovery, spending
from .spending import BuildEnded, Deps

log = logging.getLogger(__name__)

STATUS_QUEUE = "budget"


def register(bus: Bus, deps: Deps, *, max_workers: int = 8) -> None:
    async def on_iteration_completed(event: IterationCompleted, _: Delivery) -> None:
        """Price the iteration's usage and charge it once; at the allowance, close the user's
        gate and sleep the builds."""
        await recovery.guarded(deps, spending.iteration_completed, event)

    async def on_build_requested(event: BuildRequested, _: Delivery) -> None:
        """Count the build among its user's running builds (asleep at once if the allowance is
        used up)."""
        await recovery.guarded(deps, spending.build_requested, event)

    async def on_build_resumed(event: BuildResumed, _: Delivery) -> None:
        """A woken build may be put to sleep again (a new wake generation): at once while the
        allowance is used up."""
        await recovery.guarded(deps, spending.build_woken, event)

    async def on_build_continued(event: BuildContinued, _: Delivery) -> None:
        """Count the build among its user's running builds again (a new wake generation)."""
        await recovery.guarded(deps, spending.build_continued, event)

    async def on_build_ended(event: BuildEnded, _: Delivery) -> None:
        """Remove the build from its user's running builds."""
        await recovery.guarded(deps, spending.build_ended, event)

    async def on_top_up_requested(event: TopUpRequested, _: Delivery) -> None:
        """Credit the top-up once, open the user's gate if that leaves allowance, then wake the
        user's builds the budget put to sleep."""
        await recovery.guarded(deps, allowance.top_up, event)

    bus.consume(IterationCompleted, on_iteration_completed, max_workers=max_workers)
    bus.consume(BuildRequested, on_build_requested, max_workers=max_workers)
    bus.consume(BuildResumed, on_build_resumed, max_workers=max_workers)
    bus.consume(BuildContinued, on_build_continued, max_workers=max_workers)
    bus.consume(BuildCompleted, on_build_ended, max_workers=max_workers)
    bus.consume(BuildFailed, on_build_ended, max_workers=max_workers)
    bus.consume(BuildCancelled, on_build_ended, max_workers=max_workers)
    bus.consume(BuildRejected, on_build_ended, max_workers=max_workers)
    bus.consume(TopUpRequested, on_top_up_requested, max_workers=max_workers)


async def status(deps: Deps, request: BudgetStatusRequest) -> BudgetStatusReply:
    """The user's spend and allowance, from an intact store."""
    await recovery.ensure_intact(deps)
    current = await allowance.allowance(deps, request.user_id, unseen_tier=request.tier)
    return BudgetStatusReply(status=current.as_status(request.user_id))


def status_responder(deps: Deps) -> Responder[BudgetStatusRequest, BudgetStatusReply]:
    """Answers BudgetStatusRequests on BUDGET_STATUS (queue group "budget"), concurrently."""
    return Responder(
        subjects.BUDGET_STATUS,
        STATUS_QUEUE,
        BudgetStatusRequest,
        BudgetStatusReply,
        partial(status, deps),
        failure="budget status",
    )
