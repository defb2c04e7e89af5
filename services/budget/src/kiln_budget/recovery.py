"""A store that has lost its data is rebuilt from the stream before it charges again.

The budget's store is a cache of the stream: every spend, top-up, tier, running and sleeping build
it holds follows from messages the stream keeps (longer than a cycle, ``subjects.MAX_AGE_S``).
The store says when it has lost them (Redis flushed or restarted empty: its intact mark is gone)
and refuses charges and top-ups until then (``SpendLost``). ``ensure_intact`` then replays the
budget's inputs in stream order through ``fold`` with the same rules and the same pricing
(``spending.cost_of``) as when they were first handled: the charge ledger is per event id, the
top-up ledger per top-up id, so what is still there, or folded twice, counts once.

No message is published by a rebuild (the sleeps and wakes were sent the first time), and
a message that cannot be priced or read is skipped, as it was dead-lettered then.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from kiln_contracts import (
    BuildCancelled,
    BuildCompleted,
    BuildContinued,
    BuildFailed,
    BuildRejected,
    BuildRequested,
    BuildResumed,
    Envelope,
    IterationCompleted,
    SleepRequested,
    TopUpRequested,
)
from kiln_runtime.errors import RetryLater

from . import allowance, spending
from .ports import SpendLost
from .spending import Deps

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Envelope)
R = TypeVar("R")

# What the budget's state follows from (SleepRequested: the budget's own, which list a build
# among the user's sleeping ones).
REPLAYED: tuple[type[Envelope], ...] = (
    IterationCompleted,
    BuildRequested,
    BuildResumed,
    BuildContinued,
    BuildCompleted,
    BuildFailed,
    BuildCancelled,
    BuildRejected,
    TopUpRequested,
    SleepRequested,
)


async def guarded(deps: Deps, handle: Callable[[Deps, E], Awaitable[R]], event: E) -> R:
    """``handle(deps, event)`` on an intact store: rebuilt first if it has lost its data, before
    or while the handler runs (the store refuses the charge or the top-up then)."""
    await ensure_intact(deps)
    try:
        return await handle(deps, event)
    except SpendLost:
        await ensure_intact(deps)
    try:
        return await handle(deps, event)
    except SpendLost as err:
        raise RetryLater(f"the spend store lost its data again: {err}", delay_s=1.0) from err


async def ensure_intact(deps: Deps) -> None:
    """Rebuild the store from the stream unless it is intact (one rebuild at a time here; two
    replicas rebuilding at once fold the same messages once each, which changes nothing)."""
    if await deps.store.intact():
        return
    async with deps.rebuild_lock:
        if await deps.store.intact():
            return
        await rebuild(deps)


async def rebuild(deps: Deps) -> int:
    """Fold every message of ``REPLAYED`` the stream holds into the store, then mark it intact;
    returns how many were folded. Fails (to be retried) if the store loses its data meanwhile."""
    if deps.history is None:
        raise RuntimeError("the budget needs the stream's History to rebuild its store")
    log.warning("the spend store has lost its data (or never had any): rebuilding from the stream")
    token = await deps.store.begin_rebuild()
    folded = 0
    async for event in deps.history.replay(REPLAYED):
        await fold(deps, event)
        folded += 1
    if not await deps.store.finish_rebuild(token):
        raise RetryLater("the spend store lost its data during the rebuild", delay_s=1.0)
    log.warning("spend store rebuilt from %d messages of the stream", folded)
    return folded


async def fold(deps: Deps, event: Envelope) -> None:
    """Apply one replayed message to the store as its handler did, without publishing."""
    store = deps.store
    if isinstance(event, IterationCompleted):
        await store.charge(spending.charge_of(deps, event), replay=True)
        await store.build_started(event.user_id, event.build_id)
    elif isinstance(event, BuildRequested):
        await spending.build_started(deps, event)
    elif isinstance(event, BuildResumed):
        await spending.build_resumed(deps, event)
    elif isinstance(event, BuildContinued):
        await spending.build_continued(deps, event)
    elif isinstance(event, BuildCompleted | BuildFailed | BuildCancelled | BuildRejected):
        await spending.build_ended(deps, event)
    elif isinstance(event, TopUpRequested):
        await store.add_topup(
            event.user_id, event.topup_id, event.amount_micro_usd, event.occurred_at, replay=True
        )
    elif isinstance(event, SleepRequested):
        # As ``allowance.enforce`` marked it: in the sleep's period, at the build's generation
        # then (the BuildResumed before it in the stream, folded already).
        period = deps.calendar.period(event.occurred_at)
        generation = await store.wake_generation(event.build_id)
        await store.mark_slept(
            event.user_id, event.build_id, period.key, generation, allowance.marks_ttl(period)
        )
