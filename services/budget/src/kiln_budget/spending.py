"""The budget's domain: charge each iteration once, keep each user within a daily allowance.

Plain async functions over the ports (no broker here). Amounts are integer micro-dollars.

* Charge: an IterationCompleted is priced by model and usage and added to the user's period
  ("day") and cycle ("month") of the event's time, and to the build, once per event.
* Allowance: what is left of the cycle's budget (tier budget + top-ups) at the start of the
  period, over the periods left (this one included), plus the period's own top-ups. Unspent
  allowance rolls forward. ``demo_allowance_micro_usd`` replaces it with a fixed amount per period.
* Gate: the moment the period's spend reaches the allowance, the user's budget gate closes until
  the reset (``kiln_contracts.gates``: the agent calls no model and starts no build behind a closed
  gate, the gateway accepts none); a top-up that leaves allowance opens it again. The reset needs
  no write: a closed gate opens by itself at its ``until``.
* Sleep: after closing the gate, every running build of the user gets a SleepRequested (once per
  build, period and wake generation) and a WakeRequested scheduled for the reset (a JetStream
  message schedule: no timer here, nothing lost when this service restarts). A build that starts
  or is woken while the allowance is used up gets them too.
* Top-up: a TopUpRequested credits the user once per top-up id, opens the gate if that leaves
  allowance, then wakes the builds the budget put to sleep.
* Per-build cap: enforced by the agent (BuildFailed reason ``cost_limit``), not here.

These rules assume an intact store; ``recovery.py`` rebuilds one that has lost its data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kiln_contracts import (
    BuildCancelled,
    BuildCompleted,
    BuildContinued,
    BuildFailed,
    BuildRejected,
    BuildRequested,
    BuildResumed,
    IterationCompleted,
)
from kiln_runtime import metrics
from kiln_runtime.config import KilnConfig

from .allowance import enforce
from .deps import Deps
from .ports import Charge

log = logging.getLogger(__name__)

BuildEnded = BuildCompleted | BuildFailed | BuildCancelled | BuildRejected


@dataclass(frozen=True)
class Charged:
    amount_micro_usd: int
    applied: bool  # False: this event was charged before (a redelivery or another replica)


def cost_of(config: KilnConfig, event: IterationCompleted) -> int:
    """Micro-dollars for the iteration's usage at its model's price in force when the call was
    made. A model id with no entry is charged at the fallback's prices (never free)."""
    return config.cost(event.model, event.usage, event.occurred_at).micro_usd


def _unpriced(config: KilnConfig, event: IterationCompleted) -> None:
    """A charge at the fallback's prices is counted and logged as an error that names the model,
    once per iteration charged here (not by a rebuild's replay, ``recovery.fold``)."""
    cost = config.cost(event.model, event.usage, event.occurred_at)
    if not cost.fallback:
        return
    metrics.UNPRICED_ITERATIONS.labels("budget", event.model).inc()
    log.error(
        "no price for model %r: iteration %d charged at %s's prices; add the model to kiln.yaml",
        event.model,
        event.iteration,
        cost.priced_as,
        extra={"build_id": event.build_id, "event_id": event.event_id},
    )


def charge_of(deps: Deps, event: IterationCompleted) -> Charge:
    """The iteration's charge: its price, to the period and cycle of the event's time."""
    period = deps.calendar.period(event.occurred_at)
    return Charge(
        event_id=event.event_id,
        user_id=event.user_id,
        build_id=event.build_id,
        period=period.key,
        cycle=period.cycle,
        amount_micro_usd=cost_of(deps.config, event),
    )


async def charge_iteration(deps: Deps, event: IterationCompleted) -> Charged:
    """Charge the user (the period and cycle of the event's time) and the build, once per event."""
    charge = charge_of(deps, event)
    amount = charge.amount_micro_usd
    applied = await deps.store.charge(charge)
    extra = {"build_id": event.build_id, "event_id": event.event_id, "iteration": event.iteration}
    if applied:
        log.info("charged %d micro-USD to %s", amount, event.user_id, extra=extra)
        _count(event, amount)
        _unpriced(deps.config, event)
    else:
        log.info("iteration already charged; nothing to do", extra=extra)
    return Charged(amount, applied)


def _count(event: IterationCompleted, amount: int) -> None:
    """Tokens and cost for /metrics, once per charged iteration."""
    usage = event.usage
    for kind, tokens in (
        ("input", usage.input_tokens),
        ("output", usage.output_tokens),
        ("cache_write", usage.cache_creation_input_tokens),
        ("cache_read", usage.cache_read_input_tokens),
    ):
        metrics.MODEL_TOKENS.labels(event.model, kind).inc(tokens)
    metrics.MODEL_COST.labels(event.model).inc(amount)


async def iteration_completed(deps: Deps, event: IterationCompleted) -> list[str]:
    """Charge the iteration, then put the user's builds to sleep if that used up the allowance.

    Runs in full on a redelivery too (the charge is once; the sleep is once per build, period and
    wake generation), so a crash between the charge and the sleep loses neither."""
    await charge_iteration(deps, event)
    # A charge means the build runs (unless it ended), even if its BuildRequested is still queued.
    await deps.store.build_started(event.user_id, event.build_id)
    return await enforce(deps, event.user_id, event)


async def build_started(deps: Deps, event: BuildRequested) -> None:
    await deps.store.build_started(event.user_id, event.build_id)
    await deps.store.set_tier(event.user_id, event.tier)


async def build_requested(deps: Deps, event: BuildRequested) -> list[str]:
    """Count the build among the user's running ones. If the allowance is used up, it is put to
    sleep with the others (the agent may have started it on a gate it saw open a moment before,
    and then stopped it at its first think: its wake at the reset is scheduled here)."""
    await build_started(deps, event)
    return await enforce(deps, event.user_id, event)


async def build_ended(deps: Deps, event: BuildEnded) -> None:
    run = 0 if isinstance(event, BuildRejected) else event.continuation  # a rejected one never ran
    await deps.store.build_ended(event.user_id, event.build_id, run)


async def build_continued(deps: Deps, event: BuildContinued) -> None:
    """A build that ended runs again: it counts among its user's running builds and starts a new
    wake generation (it may be put to sleep this period even if it slept before)."""
    await deps.store.build_continued(event.user_id, event.build_id, event.continuation)
    await deps.store.resumed(event.user_id, event.build_id, str(event.event_id))


async def build_resumed(deps: Deps, event: BuildResumed) -> None:
    """A woken build starts a new wake generation: it may be put to sleep again this period."""
    await deps.store.resumed(event.user_id, event.build_id, str(event.event_id))


async def build_woken(deps: Deps, event: BuildResumed) -> list[str]:
    """A new wake generation; still over the allowance (woken by hand), the build is put to sleep
    again at once (the agent, behind the closed gate, calls no model meanwhile)."""
    await build_resumed(deps, event)
    return await enforce(deps, event.user_id, event)


# ------------------------------------------------------------------------------ reads


async def spent_today(deps: Deps, user_id: str) -> int:
    return await deps.store.user_day(user_id, deps.calendar.period(deps.now()).key)


async def spent_this_month(deps: Deps, user_id: str) -> int:
    return await deps.store.user_month(user_id, deps.calendar.period(deps.now()).cycle)


async def spent_build(deps: Deps, build_id: str) -> int:
    return await deps.store.build(build_id)


async def running_builds(deps: Deps, user_id: str) -> set[str]:
    return await deps.store.running(user_id)
