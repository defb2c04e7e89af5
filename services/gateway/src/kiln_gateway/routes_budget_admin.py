"""``POST /v1/budget/top-up`` (admin): credit a user and wake the builds the budget put to sleep.

The budget service applies it (request/reply on ``kiln.rpc.budget.top_up``): it credits the
user once per ``topup_id``, opens the user's budget gate if that leaves allowance, then sends a
WakeRequested (reason ``top-up``) to each build it put to sleep. The gateway writes nothing of the
budget's.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from kiln_contracts.rpc import TopUpRequest

from .deps import Key, Rt
from .problems import responses

log = logging.getLogger(__name__)

router = APIRouter()

Ident = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]


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
    woken: list[str] = Field(
        description="The builds sent a WakeRequested (none while the allowance is still used up)."
    )


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
    try:
        request = TopUpRequest(user_id=body.user_id, topup_id=topup_id, amount_micro_usd=micro)
    except ValidationError as err:
        raise HTTPException(422, f"invalid top-up id {topup_id!r}") from err
    try:
        reply = await rt.budget.top_up(request)
    except Exception as err:
        log.warning("the budget service did not answer a top-up: %s", err)
        raise HTTPException(
            503, "the budget service did not answer; retry with the same topup_id"
        ) from err
    if not reply.ok:
        raise HTTPException(503, f"{reply.error}; retry with the same topup_id")
    log.info("top-up of %d micro-USD for %s woke %s", micro, body.user_id, reply.woken)
    return TopUpDone(
        user_id=body.user_id, topup_id=topup_id, amount_micro_usd=micro, woken=reply.woken
    )
