"""The budget's subscribers: validation is the bus's, the work is the domain's."""

from __future__ import annotations

from kiln_contracts import (
    BuildCancelled,
    BuildCompleted,
    BuildFailed,
    BuildRequested,
    BuildResumed,
    IterationCompleted,
)
from kiln_runtime.bus import Bus, Delivery

from . import spending
from .spending import BuildEnded, Deps


def register(bus: Bus, deps: Deps, *, max_workers: int = 8) -> None:
    async def on_iteration_completed(event: IterationCompleted, _: Delivery) -> None:
        """Price the iteration's usage and charge it once; at the allowance, sleep the builds."""
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
