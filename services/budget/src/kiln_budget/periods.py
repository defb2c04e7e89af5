"""Allowance periods: what "today" and "this month" mean to the budget.

Production uses UTC calendar days inside UTC calendar months (``UtcCalendar``). Tests and the demo
shrink time with ``ShortCalendar``: a "day" of ``period_s`` seconds and a "month" of
``periods_per_cycle`` such days, counted from the Unix epoch. Both name their periods with the keys
the Redis counters use (``2025-03-31`` / ``2025-03`` in production, ``p<n>`` / ``c<n>`` when short).
"""

from __future__ import annotations

import calendar as stdlib_calendar
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol


@dataclass(frozen=True)
class Period:
    """One allowance period (a "day") and the budget cycle (a "month") it belongs to."""

    key: str  # the day's counter key: 2025-03-31 (or p<n>)
    cycle: str  # the month's counter key: 2025-03 (or c<n>)
    start: datetime
    end: datetime  # the reset: the next period starts here, and a sleeping build wakes
    cycle_start: datetime
    cycle_end: datetime
    days_left: int  # periods left in the cycle, this one included (>= 1)

    @property
    def length_s(self) -> float:
        return (self.end - self.start).total_seconds()


class Calendar(Protocol):
    def period(self, moment: datetime) -> Period:
        """The period ``moment`` falls in (a naive datetime is taken as UTC)."""
        ...


def as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


class UtcCalendar:
    """UTC calendar days in UTC calendar months."""

    def period(self, moment: datetime) -> Period:
        moment = as_utc(moment)
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        days_in_month = stdlib_calendar.monthrange(start.year, start.month)[1]
        cycle_start = start.replace(day=1)
        return Period(
            key=start.date().isoformat(),
            cycle=f"{start.year:04d}-{start.month:02d}",
            start=start,
            end=start + timedelta(days=1),
            cycle_start=cycle_start,
            cycle_end=cycle_start + timedelta(days=days_in_month),
            days_left=days_in_month - start.day + 1,
        )


@dataclass(frozen=True)
class ShortCalendar:
    """Periods of ``period_s`` seconds, ``periods_per_cycle`` to a cycle (tests and the demo)."""

    period_s: float
    periods_per_cycle: int = 30

    def __post_init__(self) -> None:
        if self.period_s <= 0 or self.periods_per_cycle < 1:
            raise ValueError("a period lasts > 0 s and a cycle holds >= 1 period")

    def period(self, moment: datetime) -> Period:
        seconds = as_utc(moment).timestamp()
        n = math.floor(seconds / self.period_s)
        c = n // self.periods_per_cycle
        first = c * self.periods_per_cycle

        def at(index: int) -> datetime:
            return datetime.fromtimestamp(index * self.period_s, UTC)

        return Period(
            key=f"p{n}",
            cycle=f"c{c}",
            start=at(n),
            end=at(n + 1),
            cycle_start=at(first),
            cycle_end=at(first + self.periods_per_cycle),
            days_left=first + self.periods_per_cycle - n,
        )


def rfc3339(moment: datetime) -> str:
    """``2025-03-31T00:00:00Z`` (whole seconds, rounded up so a schedule never fires early)."""
    moment = as_utc(moment)
    if moment.microsecond:
        moment = moment.replace(microsecond=0) + timedelta(seconds=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
