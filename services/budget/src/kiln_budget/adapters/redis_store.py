"""Spend counters in Redis: one Lua script charges an event exactly once.

The keys, their lifetimes and what a lost Redis means are in ``redis_keys``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..ports import Charge, SpendLost, TopUpState
from .redis_keys import (
    BUILD_TTL_S,
    CHARGED_TTL_S,
    DAY_TTL_S,
    ENDED_TTL_S,
    INTACT_KEY,
    MONTH_TTL_S,
    REBUILD_TTL_S,
    build_key,
    charged_key,
    day_key,
    ended_key,
    generation_key,
    month_key,
    rebuild_key,
    run_key,
    running_key,
    sleeping_key,
    slept_key,
    tier_key,
    topup_key,
    topup_member,
    topups_key,
)
from .redis_scripts import (
    CHARGE_LUA,
    CONTINUED_LUA,
    ENDED_LUA,
    FINISH_LUA,
    RESUMED_LUA,
    STARTED_LUA,
    TOPUP_LUA,
)


class RedisSpendStore:
    """The SpendStore on Redis. ``open()`` creates the client (nothing connects before)."""

    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._redis: aioredis.Redis | None = None
        self._charge: Any = None
        self._started: Any = None
        self._ended: Any = None
        self._resumed: Any = None
        self._continued: Any = None
        self._topup: Any = None
        self._finish: Any = None

    async def open(self) -> None:
        client = aioredis.from_url(
            self.url,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            health_check_interval=30,
            decode_responses=True,
        )
        await client.ping()
        self._redis = client
        self._charge = client.register_script(CHARGE_LUA)
        self._started = client.register_script(STARTED_LUA)
        self._ended = client.register_script(ENDED_LUA)
        self._resumed = client.register_script(RESUMED_LUA)
        self._continued = client.register_script(CONTINUED_LUA)
        self._topup = client.register_script(TOPUP_LUA)
        self._finish = client.register_script(FINISH_LUA)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()  # type: ignore[attr-defined]  # stale stubs
            self._redis = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("RedisSpendStore used before open()")
        return self._redis

    async def charge(self, charge: Charge, *, replay: bool = False) -> bool:
        _ = self.redis
        applied = int(
            await self._charge(
                keys=[
                    charged_key(charge.event_id),
                    day_key(charge.user_id, charge.period),
                    month_key(charge.user_id, charge.cycle),
                    build_key(charge.build_id),
                    INTACT_KEY,
                ],
                args=[
                    charge.amount_micro_usd,
                    CHARGED_TTL_S,
                    DAY_TTL_S,
                    MONTH_TTL_S,
                    BUILD_TTL_S,
                    "0" if replay else "1",
                ],
            )
        )
        if applied < 0:
            raise SpendLost("Redis has lost the spend counters (no intact mark)")
        return bool(applied)

    async def _int(self, key: str) -> int:
        value = await self.redis.get(key)
        return int(value) if value is not None else 0

    async def user_day(self, user_id: str, period: str) -> int:
        return await self._int(day_key(user_id, period))

    async def user_month(self, user_id: str, cycle: str) -> int:
        return await self._int(month_key(user_id, cycle))

    async def build(self, build_id: str) -> int:
        return await self._int(build_key(build_id))

    async def build_started(self, user_id: str, build_id: str) -> bool:
        _ = self.redis
        added = await self._started(
            keys=[running_key(user_id), ended_key(build_id), run_key(build_id)], args=[build_id]
        )
        return bool(int(added))

    async def build_ended(self, user_id: str, build_id: str, continuation: int = 0) -> None:
        _ = self.redis
        await self._ended(
            keys=[
                running_key(user_id),
                ended_key(build_id),
                sleeping_key(user_id),
                run_key(build_id),
            ],
            args=[build_id, ENDED_TTL_S, continuation],
        )

    async def build_continued(self, user_id: str, build_id: str, continuation: int) -> bool:
        _ = self.redis
        added = await self._continued(
            keys=[running_key(user_id), ended_key(build_id), run_key(build_id)],
            args=[build_id, ENDED_TTL_S, continuation],
        )
        return bool(int(added))

    async def running(self, user_id: str) -> set[str]:
        members = await self.redis.smembers(running_key(user_id))  # type: ignore[misc]
        return {str(m) for m in members}

    async def set_tier(self, user_id: str, tier: str) -> None:
        await self.redis.set(tier_key(user_id), tier, ex=MONTH_TTL_S)

    async def tier(self, user_id: str) -> str | None:
        value = await self.redis.get(tier_key(user_id))
        return None if value is None else str(value)

    # ------------------------------------------------------------------ top-ups, sleep and wake

    async def add_topup(
        self,
        user_id: str,
        topup_id: str,
        amount_micro_usd: int,
        at: datetime,
        *,
        replay: bool = False,
    ) -> TopUpState:
        _ = self.redis
        state = str(
            await self._topup(
                keys=[topup_key(user_id, topup_id), topups_key(user_id), INTACT_KEY],
                args=[
                    topup_member(topup_id, amount_micro_usd),
                    at.timestamp(),
                    MONTH_TTL_S,
                    at.timestamp() - MONTH_TTL_S,
                    "0" if replay else "1",
                ],
            )
        )
        if state == "lost":
            raise SpendLost("Redis has lost the top-ups (no intact mark)")
        if state not in ("new", "credited", "woken"):
            raise RuntimeError(f"unexpected top-up state {state!r}")
        return cast(TopUpState, state)

    async def topup_woken(self, user_id: str, topup_id: str) -> None:
        await self.redis.set(topup_key(user_id, topup_id), "woken", xx=True, keepttl=True)

    async def topups(self, user_id: str, since: datetime, until: datetime) -> int:
        members = await self.redis.zrangebyscore(
            topups_key(user_id), since.timestamp(), f"({until.timestamp()}"
        )
        return sum(int(str(m).rsplit(":", 1)[1]) for m in members)

    async def wake_generation(self, build_id: str) -> str:
        value = await self.redis.get(generation_key(build_id))
        return "0" if value is None else str(value)

    async def slept(self, build_id: str, period: str) -> str | None:
        value = await self.redis.get(slept_key(build_id, period))
        return None if value is None else str(value)

    async def mark_slept(
        self, user_id: str, build_id: str, period: str, generation: str, ttl_s: int
    ) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(slept_key(build_id, period), generation, ex=ttl_s)
            pipe.sadd(sleeping_key(user_id), build_id)
            pipe.expire(sleeping_key(user_id), MONTH_TTL_S)
            await pipe.execute()

    async def resumed(self, user_id: str, build_id: str, generation: str) -> None:
        _ = self.redis
        await self._resumed(
            keys=[generation_key(build_id), sleeping_key(user_id)],
            args=[generation, build_id, ENDED_TTL_S],
        )

    async def sleeping(self, user_id: str) -> set[str]:
        members = await self.redis.smembers(sleeping_key(user_id))  # type: ignore[misc]
        return {str(m) for m in members}

    # ------------------------------------------------------------------ loss and rebuild

    async def intact(self) -> bool:
        return bool(await self.redis.exists(INTACT_KEY))

    async def begin_rebuild(self) -> str:
        token = uuid.uuid4().hex
        await self.redis.set(rebuild_key(token), "1", ex=REBUILD_TTL_S)
        return token

    async def finish_rebuild(self, token: str) -> bool:
        _ = self.redis
        done = await self._finish(
            keys=[rebuild_key(token), INTACT_KEY], args=[datetime.now(UTC).isoformat()]
        )
        return bool(int(done))
