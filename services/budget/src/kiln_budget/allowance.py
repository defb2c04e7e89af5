"""A user's allowance, their budget gate, and the sleeps and wakes that keep them within it.

The rules are in ``spending``'s docstring (allowance, gate, sleep, top-up); this module computes
the allowance, keeps the gate in step with it, puts running builds to sleep at it and wakes them
on a top-up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from kiln_contracts import (
    BudgetGate,
    Envelope,
    SleepRequested,
    TopUpRequested,
    WakeRequested,
    stable_id,
)
from kiln_contracts.rpc import BudgetStatus
from kiln_runtime.errors import Conflict

from .deps import Deps
from .periods import Period

log = logging.getLogger(__name__)

# The name of a build's one pending budget wake: kiln.schedule.<build_id>.budget-wake
WAKE_SCHEDULE = "budget-wake"
SLEEP_REASON_DAY = "daily allowance used up"
SLEEP_REASON_CYCLE = "monthly budget used up"
WAKE_REASON = "allowance reset"


# ------------------------------------------------------------------------------ allowance


@dataclass(frozen=True)
class Allowance:
    """A user's allowance in the current period ("today")."""

    tier: str
    period: Period
    monthly_budget_micro_usd: int
    topups_micro_usd: int  # made this cycle, this period's included
    spent_month_micro_usd: int
    spent_today_micro_usd: int
    allowance_today_micro_usd: int

    @property
    def remaining_today_micro_usd(self) -> int:
        return max(0, self.allowance_today_micro_usd - self.spent_today_micro_usd)

    @property
    def exhausted(self) -> bool:
        return self.spent_today_micro_usd >= self.allowance_today_micro_usd

    @property
    def cycle_left_micro_usd(self) -> int:
        """What is left of the cycle's budget and top-ups after everything spent so far."""
        return self.monthly_budget_micro_usd + self.topups_micro_usd - self.spent_month_micro_usd

    def wake_at(self) -> datetime:
        """When a build put to sleep now should wake: the next period, or the next cycle when
        nothing is left for the periods between."""
        return self.period.end if self.cycle_left_micro_usd > 0 else self.period.cycle_end

    def gate(self, user_id: str, now: datetime) -> BudgetGate:
        """The user's gate for this allowance: closed until the wake while it is used up."""
        if not self.exhausted:
            return BudgetGate.opened(user_id).model_copy(update={"updated_at": now})
        wake_at = self.wake_at()
        return BudgetGate(
            user_id=user_id,
            state="closed",
            until=wake_at,
            reason=SLEEP_REASON_DAY if wake_at == self.period.end else SLEEP_REASON_CYCLE,
            spent_micro_usd=self.spent_today_micro_usd,
            allowance_micro_usd=self.allowance_today_micro_usd,
            updated_at=now,
        )

    def as_status(self, user_id: str) -> BudgetStatus:
        """The allowance as the budget answers it (``kiln.rpc.budget.status``)."""
        return BudgetStatus(
            user_id=user_id,
            tier=self.tier,
            period=self.period.key,
            cycle=self.period.cycle,
            period_start=self.period.start,
            period_end=self.period.end,
            allowance_micro_usd=self.allowance_today_micro_usd,
            spent_period_micro_usd=self.spent_today_micro_usd,
            remaining_micro_usd=self.remaining_today_micro_usd,
            spent_cycle_micro_usd=self.spent_month_micro_usd,
            topups_cycle_micro_usd=self.topups_micro_usd,
            monthly_budget_micro_usd=self.monthly_budget_micro_usd,
            wake_at=self.wake_at(),
        )


def daily_allowance(budget: int, spent_before_today: int, days_left: int) -> int:
    """The budget left at the start of today over the days left (today too), never negative.

    Unspent allowance rolls forward: a quiet day raises every later day's allowance.
    """
    return max(0, budget - spent_before_today) // max(1, days_left)


async def allowance(
    deps: Deps,
    user_id: str,
    tier: str | None = None,
    *,
    unseen_tier: str | None = None,
    at: datetime | None = None,
) -> Allowance:
    """The user's allowance now (or ``at``): by ``tier``, else the tier last seen in their
    BuildRequested, else ``unseen_tier``, else ``free``."""
    period = deps.calendar.period(at or deps.now())
    tier_name = tier or await deps.store.tier(user_id) or unseen_tier or "free"
    monthly = deps.config.tier(tier_name).monthly_budget_micro_usd
    spent_month = await deps.store.user_month(user_id, period.cycle)
    spent_today = await deps.store.user_day(user_id, period.key)
    topups_before = await deps.store.topups(user_id, period.cycle_start, period.start)
    topups_today = await deps.store.topups(user_id, period.start, period.end)
    if deps.demo_allowance_micro_usd is not None:
        today = deps.demo_allowance_micro_usd + topups_today
    else:
        before = spent_month - spent_today
        today = daily_allowance(monthly + topups_before, before, period.days_left) + topups_today
    return Allowance(
        tier=tier_name,
        period=period,
        monthly_budget_micro_usd=monthly,
        topups_micro_usd=topups_before + topups_today,
        spent_month_micro_usd=spent_month,
        spent_today_micro_usd=spent_today,
        allowance_today_micro_usd=today,
    )


# ------------------------------------------------------------------------------ sleep and wake


GATE_ATTEMPTS = 5


async def keep_gate(deps: Deps, user_id: str, now: datetime) -> tuple[Allowance, BudgetGate]:
    """The user's allowance at ``now``, with their gate kept in step: closed while the allowance
    is used up (written again when its reset, its allowance or a higher spend is to be told),
    opened when it is not and the gate is still closed (a top-up).

    The gate is read before the allowance is computed and written only if it has not moved since
    (compare-and-set): of a charge and a top-up computed at the same time, the one that computed
    on older figures writes nothing and computes again."""
    for _ in range(GATE_ATTEMPTS):
        current, revision = (None, 0) if deps.gates is None else await deps.gates.read(user_id)
        status = await allowance(deps, user_id, at=now)
        gate = status.gate(user_id, now)
        change = _changes(current, gate, now)
        if deps.gates is None or not change or await deps.gates.write(gate, revision):
            if change and deps.gates is not None:
                log.info("budget gate of %s %s", user_id, gate.state)
            return status, gate
    raise Conflict(f"the budget gate of {user_id} kept changing under {GATE_ATTEMPTS} attempts")


def _changes(current: BudgetGate | None, gate: BudgetGate, now: datetime) -> bool:
    """Whether ``gate`` says something ``current`` does not (so that the charges of builds
    finishing their calls together do not all rewrite a gate another charge has just closed)."""
    if current is None or not current.closed_at(now):
        return gate.state == "closed"
    if gate.state == "open":
        return True
    return (current.until, current.allowance_micro_usd) != (
        gate.until,
        gate.allowance_micro_usd,
    ) or current.spent_micro_usd < gate.spent_micro_usd


async def enforce(deps: Deps, user_id: str, cause: Envelope | None = None) -> list[str]:
    """At the allowance, close the user's gate, then put each running build of the user to sleep
    until the reset.

    Returns the builds asked to sleep now. Per build: schedule the wake first, then request the
    sleep, then remember it; a crash in between redoes the steps (the same event ids: the server
    drops a repeat within its duplicate window, the agent ignores a second sleep or wake)."""
    now = deps.now()
    status, gate = await keep_gate(deps, user_id, now)
    if not status.exhausted:
        return []
    if deps.commands is None:
        raise RuntimeError("the budget needs Commands to put builds to sleep")
    wake_at = status.wake_at()
    asleep = []
    for build_id in sorted(await deps.store.running(user_id)):
        generation = await deps.store.wake_generation(build_id)
        if await deps.store.slept(build_id, status.period.key) == generation:
            continue
        causation = cause.event_id if cause else None
        wake = WakeRequested(
            event_id=stable_id(build_id, "budget-wake", wake_at.isoformat()),
            build_id=build_id,
            user_id=user_id,
            causation_id=causation,
            reason=WAKE_REASON,
        )
        await deps.commands.publish_at(wake, wake_at, WAKE_SCHEDULE)
        sleep = SleepRequested(
            event_id=stable_id(build_id, "budget-sleep", status.period.key, generation),
            build_id=build_id,
            user_id=user_id,
            occurred_at=now,  # the budget's time: a rebuild places the sleep in its period
            causation_id=causation,
            reason=gate.sleep_reason,
            wake_at=wake_at,
        )
        await deps.commands.publish(sleep)
        await deps.store.mark_slept(
            user_id, build_id, status.period.key, generation, marks_ttl(status.period)
        )
        log.info(
            "asked to sleep until %s: %s",
            wake_at.isoformat(),
            gate.reason,
            extra={"build_id": build_id},
        )
        asleep.append(build_id)
    return asleep


async def top_up(deps: Deps, command: TopUpRequested) -> set[str]:
    """Credit the user once per top-up id, at the command's time; open their gate if that leaves
    allowance, then wake the builds the budget put to sleep; returns the builds woken. A repeat
    changes nothing; a repeat of a top-up whose wakes were not all sent (a crash in between) sends
    them."""
    if deps.commands is None:
        raise RuntimeError("the budget needs Commands to wake builds")
    user_id, topup_id = command.user_id, command.topup_id
    extra = {"build_id": command.build_id, "event_id": command.event_id}
    state = await deps.store.add_topup(
        user_id, topup_id, command.amount_micro_usd, command.occurred_at
    )
    if state == "woken":
        log.info("top-up %s of %s already applied; nothing to do", topup_id, user_id, extra=extra)
        return set()
    await keep_gate(deps, user_id, deps.now())  # the gate first: a woken build finds it open
    woken = await deps.store.sleeping(user_id)
    for build_id in sorted(woken):
        await deps.commands.publish(
            WakeRequested(
                event_id=stable_id(build_id, "top-up", topup_id),
                build_id=build_id,
                user_id=user_id,
                causation_id=command.event_id,
                reason="top-up",
            )
        )
    await deps.store.topup_woken(user_id, topup_id)
    log.info(
        "top-up %s of %d micro-USD for %s woke %s",
        topup_id,
        command.amount_micro_usd,
        user_id,
        sorted(woken),
        extra=extra,
    )
    await enforce(deps, user_id)  # still over the allowance: the woken builds sleep again
    return woken


def marks_ttl(period: Period) -> int:
    """Keep per-period marks for two periods (and at least a minute)."""
    return max(60, int(period.length_s * 2))
