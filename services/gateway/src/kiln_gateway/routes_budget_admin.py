"""``POST /v1/budget/top-up`` (admin): credit a user and wake the builds the budget put to sleep.

The budget service owns spend and top-ups: this route sends it a ``TopUpRequested`` on the bus
(event id stable per user and top-up id, so a retry is dropped by the server or ignored by the
budget) and the budget applies it once, counting it into the allowance of the period it was
requested in, and wakes the builds it put to sleep.
"""

from __future__ import annotations

import logging
import re
import uuid
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from kiln_contracts import TopUpRequested, stable_id

from .deps import Key, Rt, require_admin
from .problems import responses

log = logging.getLogger(__name__)

router = APIRouter()

IDENT = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
Ident = Annotated[str, StringConstraints(pattern=IDENT)]


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
        description="The user's builds asleep now: the budget wakes those it put to sleep."
    )


def topup_id_of(idempotency_key: str | None) -> str | None:
    """The Idempotency-Key as a top-up id (one that starts with ``_`` or ``-``, which ids may
    not, stands for a stable digest of it)."""
    if idempotency_key is None or re.fullmatch(IDENT, idempotency_key):
        return idempotency_key
    return stable_id("idempotency-key", idempotency_key).hex


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
    topup_id = body.topup_id or topup_id_of(idempotency_key) or uuid.uuid4().hex
    micro = int(body.amount_usd * 1_000_000)
    command = TopUpRequested.of(body.user_id, topup_id, micro)
    try:
        asleep = await rt.store.list_for_user(
            body.user_id, status="sleeping", limit=100, before=None
        )
        await rt.publish(command)
    except Exception as err:
        log.warning("top-up %s for %s not sent: %s", topup_id, body.user_id, err)
        raise HTTPException(
            503, "the top-up could not be sent; retry with the same topup_id"
        ) from err
    log.info("top-up of %d micro-USD for %s sent (%s)", micro, body.user_id, topup_id)
    woken = sorted(b.build_id for b in asleep)
    return TopUpDone(user_id=body.user_id, topup_id=topup_id, amount_micro_usd=micro, woken=woken)
