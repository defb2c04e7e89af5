"""Retries with jittered exponential backoff: the one place that decides how to wait."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Full-jitter delay before retry ``attempt`` (1-based)."""
    return random.uniform(0, min(cap, base * (2 ** (attempt - 1))))


async def retry(
    fn: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    retry_on: tuple[type[BaseException], ...],
    base: float = 0.5,
    cap: float = 30.0,
    delay_for: Callable[[BaseException, int], float | None] | None = None,
    give_up: Callable[[BaseException], bool] | None = None,
    on_retry: Callable[[BaseException, int], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds or ``attempts`` are spent; re-raise the last error.

    ``delay_for(error, attempt)`` may return a server-advised delay (e.g. retry-after).
    ``give_up(error)``: re-raise at once an error of ``retry_on`` that no retry can mend.
    ``on_retry(error, attempt)`` is told of each failure about to be retried (to log it).
    """
    for attempt in range(1, attempts + 1):
        try:
            return await fn()
        except retry_on as err:
            if attempt == attempts or (give_up is not None and give_up(err)):
                raise
            if on_retry is not None:
                on_retry(err, attempt)
            advised = delay_for(err, attempt) if delay_for else None
            await asyncio.sleep(
                advised if advised is not None else backoff_delay(attempt, base, cap)
            )
    raise AssertionError("unreachable")
