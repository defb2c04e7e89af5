"""What the budget domain needs from the outside world."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from kiln_contracts import BudgetGate, Envelope


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware (UTC)."""
        ...


@dataclass(frozen=True)
class Charge:
    """One iteration's cost, to be added to a user's period and cycle and to a build, once."""

    event_id: uuid.UUID
    user_id: str
    build_id: str
    period: str  # the period's counter key (2025-03-31)
    cycle: str  # the cycle's counter key (2025-03)
    amount_micro_usd: int


class SpendLost(Exception):
    """The store has lost its data (its "intact" mark is gone: a flushed or empty Redis): it
    charges and credits nothing until it has been rebuilt from the stream."""


# A top-up's state in the store: "new" (credited now), "credited" (before, its wakes not yet
# known to be sent), "woken" (credited and its wakes sent: nothing left to do).
TopUpState = Literal["new", "credited", "woken"]


class SpendStore(Protocol):
    """Spend counters (integer micro-dollars), top-ups, running and sleeping builds.

    The store knows whether it holds everything since it was last rebuilt (``intact``): a store
    that has lost its data refuses ``charge`` and ``add_topup`` (``SpendLost``) until
    ``finish_rebuild``; ``replay=True`` (the rebuild itself) skips that check."""

    async def charge(self, charge: Charge, *, replay: bool = False) -> bool:
        """Apply ``charge`` atomically unless its event_id was charged before; True if applied."""
        ...

    async def user_day(self, user_id: str, period: str) -> int: ...

    async def user_month(self, user_id: str, cycle: str) -> int: ...

    async def build(self, build_id: str) -> int: ...

    async def build_started(self, user_id: str, build_id: str) -> bool:
        """Mark a build running (unless it already ended); True if it was added."""
        ...

    async def build_ended(self, user_id: str, build_id: str, continuation: int = 0) -> None:
        """Mark a run of a build ended (``continuation``: 0 for its first run): unless the build
        has continued since, it leaves the running (and sleeping) set, for good until it
        continues."""
        ...

    async def build_continued(self, user_id: str, build_id: str, continuation: int) -> bool:
        """Mark a build running again in its run ``continuation`` (once per run, and not if that
        run has ended already); True if it was added."""
        ...

    async def running(self, user_id: str) -> set[str]: ...

    async def set_tier(self, user_id: str, tier: str) -> None: ...

    async def tier(self, user_id: str) -> str | None: ...

    async def add_topup(
        self,
        user_id: str,
        topup_id: str,
        amount_micro_usd: int,
        at: datetime,
        *,
        replay: bool = False,
    ) -> TopUpState:
        """Credit ``amount`` at ``at`` unless the user's ``topup_id`` was credited before (the
        same id again, whatever its amount, is one top-up); its state now."""
        ...

    async def topup_woken(self, user_id: str, topup_id: str) -> None:
        """The top-up's wakes have been sent."""
        ...

    async def topups(self, user_id: str, since: datetime, until: datetime) -> int:
        """Sum of the user's top-ups made in ``[since, until)``."""
        ...

    async def wake_generation(self, build_id: str) -> str:
        """Changes each time the build resumes (its last BuildResumed); "0" before the first."""
        ...

    async def slept(self, build_id: str, period: str) -> str | None:
        """The wake generation the budget last put the build to sleep in, in ``period``."""
        ...

    async def mark_slept(
        self, user_id: str, build_id: str, period: str, generation: str, ttl_s: int
    ) -> None:
        """Remember the sleep (see ``slept``) and list the build among the user's sleeping ones."""
        ...

    async def resumed(self, user_id: str, build_id: str, generation: str) -> None:
        """The build resumed: a new wake generation, and it leaves the sleeping set (once per
        generation: the same one again changes nothing, the build may be asleep again since)."""
        ...

    async def sleeping(self, user_id: str) -> set[str]: ...

    async def intact(self) -> bool:
        """True unless the store has lost its data since its last rebuild (or never had one)."""
        ...

    async def begin_rebuild(self) -> str:
        """Start a rebuild; returns its token (lost with the data, should that go again)."""
        ...

    async def finish_rebuild(self, token: str) -> bool:
        """Mark the store intact, unless it lost its data (and the token) during the rebuild."""
        ...


class History(Protocol):
    """The stream, read back: the budget's own inputs, to rebuild a store that lost its data."""

    def replay(self, kinds: Sequence[type[Envelope]]) -> AsyncIterator[Envelope]:
        """Every valid message of ``kinds`` the stream holds, in stream order, up to the last
        one stored when the replay reached it; then the iterator ends."""
        ...


class Commands(Protocol):
    """The bus, as the budget uses it: publish now, or at a time (a JetStream message schedule)."""

    async def publish(self, msg: Envelope) -> None: ...

    async def publish_at(self, msg: Envelope, at: datetime, name: str) -> None:
        """Deliver ``msg`` at ``at``; one pending schedule per (build, name): a new one replaces it."""
        ...


class Gates(Protocol):
    """The users' budget gates (JetStream key-value bucket KILN_BUDGET_GATES); the budget is their
    only writer. A write is compare-and-set on the revision read, so that a decision made on older
    figures (a charge racing a top-up) never overwrites a newer one."""

    async def read(self, user_id: str) -> tuple[BudgetGate | None, int]:
        """The user's gate and its revision (None, and the revision to write over, if none)."""
        ...

    async def write(self, gate: BudgetGate, revision: int) -> bool:
        """Write ``gate`` if the user's gate is still at ``revision``; False if it moved on."""
        ...
