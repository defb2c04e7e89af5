"""The budget service's spend counters in Redis, read only.

Keys (written by the budget service): ``kiln:spend:user:<user>:day:<YYYY-MM-DD>`` and
``kiln:spend:user:<user>:month:<YYYY-MM>``, integer micro-dollars; ``kiln:budget:user:<user>``,
a hash with the user's allowance as the budget service last computed it (its period, top-ups,
remaining, wake time).
"""

from __future__ import annotations

import redis.asyncio as aioredis


class RedisSpend:
    def __init__(self, url: str, timeout_s: float) -> None:
        # A client connects on its first command, not here.
        self.redis = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

    async def spent(self, user_id: str, day: str, month: str) -> tuple[int, int]:
        today, this_month = await self.redis.mget(
            f"kiln:spend:user:{user_id}:day:{day}", f"kiln:spend:user:{user_id}:month:{month}"
        )
        return int(today or 0), int(this_month or 0)

    async def status(self, user_id: str) -> dict[str, str] | None:
        raw = await self.redis.hgetall(f"kiln:budget:user:{user_id}")
        return {k.decode(): v.decode() for k, v in raw.items()} or None

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()  # type: ignore[attr-defined]
