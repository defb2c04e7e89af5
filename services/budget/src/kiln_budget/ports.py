"""What the budget domain needs from the outside world."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

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


class SpendStore(Protocol):
    """Spend counters (integer micro-dollars), top-ups, running and sleeping builds."""

    async def charge(self, charge: Charge) -> bool:
        """Apply ``charge`` atomically unless its event_id was charged before; True if applied."""
        ...

    async def user_day(self, user_id: str, period: str) -> int: ...

    async def user_month(self, user_id: str, cycle: str) -> int: ...

    async def build(self, build_id: str) -> int: ...

    async def build_started(self, user_id: str, build_id: str) -> bool:
        """Mark a build running (unless it already ended); True if it was added."""
        ...

    async def build_ended(self, user_id: str, build_id: str) -> None:
        """Mark a build ended for good: it leaves the running (and sleeping) set for good."""
        ...

    async def running(self, user_id: str) -> set[str]: ...

    async def set_tier(self, user_id: str, tier: str) -> None: ...

    async def tier(self, user_id: str) -> str | None: ...

    async def add_topup(
        self, user_id: str, topup_id: str, amount_micro_usd: int, at: datetime
    ) -> None:
        """Credit ``amount`` at ``at`` (the same ``topup_id`` again is one top-up)."""
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

    async def save_status(self, user_id: str, status: dict[str, str], ttl_s: int) -> None:
        """The user's latest allowance, for the gateway's GET /v1/budget (a thin read)."""
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
