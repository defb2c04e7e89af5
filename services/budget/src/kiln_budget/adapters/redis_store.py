"""Spend counters in Redis: one Lua script charges an event exactly once.

The budget service alone reads and writes these keys. They are a cache of the stream: a Redis
that has lost them (flushed, restarted empty) is rebuilt from the stream's events
(``recovery.py``), and until then charges and top-ups are refused (``SpendLost``).

Keys (all amounts integer micro-dollars):

* ``kiln:budget:intact``                           present while the keys hold everything since
                                                   the last rebuild (its value: when that ended)
* ``kiln:budget:rebuild:<token>``                  a rebuild under way (gone with a flush)
* ``kiln:charged:<event_id>``                      the event was charged (35-day TTL)
* ``kiln:spend:user:<user>:day:<YYYY-MM-DD>``      a user's spend on a UTC day (``p<n>`` when
                                                   periods are shortened, see ``periods.py``)
* ``kiln:spend:user:<user>:month:<YYYY-MM>``       a user's spend in a UTC month (or ``c<n>``)
* ``kiln:spend:build:<build_id>``                  a build's spend
* ``kiln:running:<user>``                          set of the user's running build ids
* ``kiln:ended:<build_id>``                        1 + the last run of the build that ended (keeps
                                                   a late BuildRequested out; ``1``: its first run)
* ``kiln:run:<build_id>``                          the build's current run (its last
                                                   BuildContinued's ``continuation``; absent: 0)
* ``kiln:tier:<user>``                             the tier of the user's latest BuildRequested

Sleep, wake and top-ups (see docs/ARCHITECTURE.md, budget):

* ``kiln:budget:topups:<user>``                    sorted set of top-ups: member ``<topup_id>:<micro>``,
                                                   score = Unix time of the top-up
* ``kiln:budget:topup:<user>:<topup_id>``          the top-up was credited (``credited``) and its
                                                   wakes sent (``woken``)
* ``kiln:budget:sleeping:<user>``                  set of the builds the budget put to sleep (a
                                                   top-up wakes these); left on BuildResumed or end
* ``kiln:budget:gen:<build_id>``                   the build's wake generation (its last BuildResumed)
* ``kiln:budget:slept:<build_id>:<period>``        the generation the budget slept the build in

The budget gates are not here: they live in the JetStream key-value bucket KILN_BUDGET_GATES
(``adapters/kv_gates.py``), which the agent and the gateway read.
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

DAY_S = 24 * 3600
CHARGED_TTL_S = 35 * DAY_S
DAY_TTL_S = 40 * DAY_S
MONTH_TTL_S = 400 * DAY_S
BUILD_TTL_S = 35 * DAY_S
ENDED_TTL_S = 35 * DAY_S

INTACT_KEY = "kiln:budget:intact"
REBUILD_TTL_S = DAY_S

# KEYS: charged, day, month, build, intact
# ARGV: amount, charged ttl, day ttl, month ttl, build ttl, "1" to refuse without the intact mark
CHARGE_LUA = """
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[5]) == 0 then
  return -1
end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return 0
end
redis.call('INCRBY', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('INCRBY', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('INCRBY', KEYS[4], ARGV[1])
redis.call('EXPIRE', KEYS[4], ARGV[5])
return 1
"""

# KEYS: ledger, topups, intact
# ARGV: member, score, ttl, trim below this score, "1" to refuse without the intact mark
TOPUP_LUA = """
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[3]) == 0 then
  return 'lost'
end
local state = redis.call('GET', KEYS[1])
if state then
  return state
end
redis.call('SET', KEYS[1], 'credited', 'EX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 'new'
"""

# KEYS: rebuild token, intact   ARGV: the intact mark's value
FINISH_LUA = """
if redis.call('DEL', KEYS[1]) == 0 then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""

# A build runs while its current run (``run``, 0 for the first) has not ended (``ended`` holds 1 +
# the last run that ended). Both only move forward, so an end or a continuation handled late,
# or twice, changes nothing it should not.

# KEYS: running, ended, run   ARGV: build id
STARTED_LUA = """
local ended = tonumber(redis.call('GET', KEYS[2]) or '0')
local run = tonumber(redis.call('GET', KEYS[3]) or '0')
if ended > run then
  return 0
end
return redis.call('SADD', KEYS[1], ARGV[1])
"""

# KEYS: generation, sleeping   ARGV: generation, build id, ttl   (once per generation)
RESUMED_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""

# KEYS: running, ended, sleeping, run   ARGV: build id, ended ttl, the run that ended
ENDED_LUA = """
local k = tonumber(ARGV[3])
if k + 1 > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], tostring(k + 1), 'EX', ARGV[2])
end
if k < tonumber(redis.call('GET', KEYS[4]) or '0') then
  return 0
end
redis.call('SREM', KEYS[3], ARGV[1])
return redis.call('SREM', KEYS[1], ARGV[1])
"""

# KEYS: running, ended, run   ARGV: build id, ttl, the run that starts (its continuation)
CONTINUED_LUA = """
local k = tonumber(ARGV[3])
if k <= tonumber(redis.call('GET', KEYS[3]) or '0') then
  return 0
end
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[2])
if tonumber(redis.call('GET', KEYS[2]) or '0') > k then
  return 0
end
return redis.call('SADD', KEYS[1], ARGV[1])
"""


def charged_key(event_id: object) -> str:
    return f"kiln:charged:{event_id}"


def day_key(user_id: str, period: str) -> str:
    return f"kiln:spend:user:{user_id}:day:{period}"


def month_key(user_id: str, cycle: str) -> str:
    return f"kiln:spend:user:{user_id}:month:{cycle}"


def build_key(build_id: str) -> str:
    return f"kiln:spend:build:{build_id}"


def running_key(user_id: str) -> str:
    return f"kiln:running:{user_id}"


def ended_key(build_id: str) -> str:
    return f"kiln:ended:{build_id}"


def run_key(build_id: str) -> str:
    return f"kiln:run:{build_id}"


def tier_key(user_id: str) -> str:
    return f"kiln:tier:{user_id}"


def topups_key(user_id: str) -> str:
    return f"kiln:budget:topups:{user_id}"


def sleeping_key(user_id: str) -> str:
    return f"kiln:budget:sleeping:{user_id}"


def generation_key(build_id: str) -> str:
    return f"kiln:budget:gen:{build_id}"


def slept_key(build_id: str, period: str) -> str:
    return f"kiln:budget:slept:{build_id}:{period}"


def topup_key(user_id: str, topup_id: str) -> str:
    return f"kiln:budget:topup:{user_id}:{topup_id}"


def rebuild_key(token: str) -> str:
    return f"kiln:budget:rebuild:{token}"


def topup_member(topup_id: str, amount_micro_usd: int) -> str:
    """A top-up's member in ``kiln:budget:topups:<user>`` (ids must not contain ':')."""
    if not topup_id or ":" in topup_id:
        raise ValueError(f"invalid top-up id {topup_id!r}: non-empty, without ':'")
    if amount_micro_usd <= 0:
        raise ValueError(f"a top-up is positive, not {amount_micro_usd}")
    return f"{topup_id}:{amount_micro_usd}"


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
