"""What the budget domain needs from the outside world."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware (UTC)."""
        ...


@dataclass(frozen=True)
class Charge:
    """One iteration's cost, to be added to a user's day and month and to a build, once."""

    event_id: uuid.UUID
    user_id: str
    build_id: str
    day: date
    amount_micro_usd: int


class SpendStore(Protocol):
    """Spend counters (integer micro-dollars) and each user's running builds."""

    async def charge(self, charge: Charge) -> bool:
        """Apply ``charge`` atomically unless its event_id was charged before; True if applied."""
        ...

    async def user_day(self, user_id: str, day: date) -> int: ...

    async def user_month(self, user_id: str, year: int, month: int) -> int: ...

    async def build(self, build_id: str) -> int: ...

    async def build_started(self, user_id: str, build_id: str) -> bool:
        """Mark a build running (unless it already ended); True if it was added."""
        ...

    async def build_ended(self, user_id: str, build_id: str) -> None:
        """Mark a build ended for good: it leaves the running set and never re-enters it."""
        ...

    async def running(self, user_id: str) -> set[str]: ...

    async def set_tier(self, user_id: str, tier: str) -> None: ...

    async def tier(self, user_id: str) -> str | None: ...
