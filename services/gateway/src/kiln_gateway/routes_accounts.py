"""The caller's budget, the admin's API keys, and the AsyncAPI document."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse

from kiln_contracts import schemas as contract_schemas

from . import accounts, budget
from .deps import Key, Me, Rt, require_admin
from .problems import problem, responses
from .schemas_accounts import BudgetOut, CreateKey, KeyCreated, KeyList, KeyOut

log = logging.getLogger(__name__)

router = APIRouter()


@router.get("/v1/budget", response_model=BudgetOut, tags=["budget"], responses=responses(401, 503))
async def get_budget(rt: Rt, me: Me) -> BudgetOut:
    """What the caller spent today and this month, and today's allowance, as the budget service
    enforces them (UTC days)."""
    try:
        rt.config.tier(me.tier)
    except KeyError as err:
        raise HTTPException(403, f"your API key's tier {me.tier!r} is not configured") from err
    try:
        asleep = await rt.store.list_for_user(me.user_id, status="sleeping", limit=100, before=None)
        view = await budget.view(rt.budget, rt.config, me, [b.build_id for b in asleep])
    except Exception as err:
        log.warning("budget unavailable: %s", err)
        raise HTTPException(503, "the budget service is unavailable; retry") from err
    return BudgetOut.of(view)


# ---------------------------------------------------------------------------- admin


@router.post(
    "/v1/admin/keys",
    status_code=201,
    response_model=KeyCreated,
    tags=["admin"],
    responses=responses(401, 422),
)
async def create_key(body: CreateKey, rt: Rt, key: Key) -> KeyCreated:
    """A new API key for a user and tier (admin key). The key is in this response only."""
    require_admin(rt, key)
    if body.tier not in rt.config.tiers:
        raise HTTPException(422, f"unknown tier {body.tier!r}; known: {sorted(rt.config.tiers)}")
    new = await accounts.create_key(rt.store, body.user_id, body.tier)
    return KeyCreated(api_key=new.key, **KeyOut.of(new.record).model_dump())


@router.get("/v1/admin/keys", response_model=KeyList, tags=["admin"], responses=responses(401))
async def list_keys(
    rt: Rt,
    key: Key,
    user_id: Annotated[str | None, Query(max_length=64)] = None,
) -> KeyList:
    require_admin(rt, key)
    return KeyList(keys=[KeyOut.of(k) for k in await rt.store.list_keys(user_id)])


@router.delete(
    "/v1/admin/keys/{ident}",
    response_model=KeyOut,
    tags=["admin"],
    responses=responses(401, 404, 409),
)
async def revoke_key(ident: str, rt: Rt, key: Key) -> KeyOut:
    """Revoke the key with this id, or the one key whose shown prefix starts with this."""
    require_admin(rt, key)
    try:
        return KeyOut.of(await accounts.revoke_key(rt.store, ident[:64]))
    except accounts.KeyNotFound as err:
        raise HTTPException(404, str(err)) from err
    except accounts.AmbiguousKey as err:
        raise HTTPException(409, str(err)) from err


# ---------------------------------------------------------------------------- AsyncAPI


def asyncapi_path(configured: str | None) -> Path:
    return Path(configured) if configured else contract_schemas.SCHEMA_DIR / "asyncapi.json"


@router.get(
    "/v1/asyncapi.json",
    tags=["docs"],
    responses={200: {"description": "The AsyncAPI document of the bus"}, **responses(404)},
)
async def asyncapi(rt: Rt) -> Any:
    """The bus's messages and subjects as an AsyncAPI document."""
    path = asyncapi_path(rt.settings.asyncapi_path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return problem(
            404,
            f"the AsyncAPI document is not generated ({path.name} missing; run `make schemas`)",
            instance="/v1/asyncapi.json",
        )
    return JSONResponse(doc)
