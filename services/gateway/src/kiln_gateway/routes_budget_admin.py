"""``POST /v1/budget/top-up`` (admin): credit a user and wake the builds the budget put to sleep.

The budget service owns the keys; this route writes through their documented contract
(``kiln_budget.adapters.redis_store``, docs/ARCHITECTURE.md "budget"):

* ``ZADD kiln:budget:topups:<user> <unix time> <topup_id>:<micro_usd>`` — the budget counts a
  top-up into the allowance of the period it was made in (spread over the rest of the cycle from
  the next period on). The same ``topup_id`` again is the same member: one top-up.
* ``SMEMBERS kiln:budget:sleeping:<user>`` — the builds the budget put to sleep; each gets a
  WakeRequested (reason ``top-up``) now. One still over the allowance is put to sleep again after
  its next iteration.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from decimal import Decimal
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import APIRouter, Header, HTTPException
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from kiln_contracts import WakeRequested, stable_id

from .deps import Key, Rt
from .problems import responses

log = logging.getLogger(__name__)

router = APIRouter()

Ident = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
TOPUPS_KEY = "kiln:budget:topups:{user_id}"
SLEEPING_KEY = "kiln:budget:sleeping:{user_id}"
KEEP_S = 400 * 24 * 3600


class TopUp(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user_id": "alice", "amount_usd": "5.00"}]},
    )

    user_id: Ident
    amount_usd: Decimal = Field(gt=0, le=1_000_000, decimal_places=6)
    topup_id: Ident | None = Field(
        default=None, description="Makes a retry safe (else the Idempotency-Key, else random)."
    )


class TopUpDone(BaseModel):
    user_id: str
    topup_id: str
    amount_micro_usd: int
    woken: list[str] = Field(description="The builds sent a WakeRequested.")


def require_admin(rt: Rt, key: Key) -> None:
    expected = rt.settings.admin_api_key
    if not expected:
        raise HTTPException(
            401, "the admin API is disabled (set KILN_ADMIN_API_KEY on the gateway)"
        )
    if not key or not hmac.compare_digest(key.encode(), expected.encode()):
        raise HTTPException(401, "admin key required", headers={"WWW-Authenticate": "Bearer"})


@router.post(
    "/v1/budget/top-up",
    response_model=TopUpDone,
    tags=["admin", "budget"],
    responses=responses(401, 422, 503),
)
async def top_up(
    body: TopUp,
    rt: Rt,
    key: Key,
    idempotency_key: Annotated[
        str | None, Header(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    ] = None,
) -> TopUpDone:
    """Credit a user (admin key) and wake their sleeping builds at once."""
    require_admin(rt, key)
    topup_id = body.topup_id or idempotency_key or uuid.uuid4().hex
    micro = int(body.amount_usd * 1_000_000)
    # A short-lived client: top-ups are rare, and nothing connects before the first one.
    client = aioredis.from_url(
        rt.settings.redis_url,
        socket_timeout=rt.settings.redis_timeout_s,
        socket_connect_timeout=rt.settings.redis_timeout_s,
        decode_responses=True,
    )
    try:
        now = time.time()
        topups = TOPUPS_KEY.format(user_id=body.user_id)
        async with client.pipeline(transaction=True) as pipe:
            pipe.zadd(topups, {f"{topup_id}:{micro}": now})
            pipe.zremrangebyscore(topups, "-inf", now - KEEP_S)
            pipe.expire(topups, KEEP_S)
            pipe.smembers(SLEEPING_KEY.format(user_id=body.user_id))
            *_, sleeping = await pipe.execute()
    except Exception as err:
        log.warning("budget store unavailable for a top-up: %s", err)
        raise HTTPException(503, "the budget store is unavailable; retry") from err
    finally:
        await client.aclose()  # type: ignore[attr-defined]
    woken = sorted(str(b) for b in sleeping)
    try:
        for build_id in woken:
            await rt.publish(
                WakeRequested(
                    event_id=stable_id(build_id, "top-up", topup_id),
                    build_id=build_id,
                    user_id=body.user_id,
                    reason="top-up",
                )
            )
    except Exception as err:
        raise HTTPException(
            503, "credited, but the wake could not be sent; retry with the same topup_id"
        ) from err
    log.info("top-up of %d micro-USD for %s woke %s", micro, body.user_id, woken)
    return TopUpDone(user_id=body.user_id, topup_id=topup_id, amount_micro_usd=micro, woken=woken)
