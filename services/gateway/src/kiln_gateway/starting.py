"""Starting a build from a route: what ``POST /v1/builds`` and ``POST /v1/builds/{id}/fork``
share (the caller's tier, the budget gate, ``builds.create_build``'s refusals as HTTP errors,
the count of builds created)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime

from fastapi import APIRouter, HTTPException, Response
from fastapi.types import DecoratedCallable
from prometheus_client import Counter

from kiln_contracts import BudgetGate, BuildLimits, ForkOrigin, QnA
from kiln_contracts.gates import TOP_UP_HINT
from kiln_runtime.config import Tier

from . import builds
from .bootstrap import Wiring
from .model import Build, Caller
from .problems import ProblemError, responses
from .schemas_builds import BuildOut

log = logging.getLogger(__name__)

BUILDS_CREATED = Counter("kiln_gateway_builds_created_total", "Builds created", ["tier"])


def post_starting(
    router: APIRouter, path: str, *, again: str, errors: tuple[int, ...]
) -> Callable[[DecoratedCallable], DecoratedCallable]:
    """The route of a POST that starts a build with ``start``: 201 with it, 200 with the one an
    earlier request with the same Idempotency-Key made (``again`` describes it), ``errors``."""
    return router.post(
        path,
        status_code=201,
        response_model=BuildOut,
        tags=["builds"],
        responses={200: {"model": BuildOut, "description": again}, **responses(*errors)},
    )


def tier_of(rt: Wiring, me: Caller) -> Tier:
    """The caller's tier; 403 if the API key's tier is not configured."""
    try:
        return rt.config.tier(me.tier)
    except KeyError as err:
        raise HTTPException(403, f"your API key's tier {me.tier!r} is not configured") from err


async def gate(rt: Wiring, user_id: str) -> BudgetGate | None:
    """The user's budget gate; None if it cannot be read now (the agent, which reads the same
    gate before it starts a build, then refuses the build if the gate is closed)."""
    try:
        return await rt.budget.gate(user_id)
    except Exception as err:
        log.warning("budget gate of %s unreadable; the agent decides: %s", user_id, err)
        return None


def used_up(gate: BudgetGate, now: datetime | None = None) -> ProblemError:
    """429 ``allowance-used-up``: what is spent, when the allowance resets, how to top up."""
    assert gate.until is not None
    wait = max(1, math.ceil((gate.until - (now or datetime.now(UTC))).total_seconds()))
    return ProblemError(
        429,
        "allowance-used-up",
        gate.refusal(),
        headers={"Retry-After": str(wait)},
        spent_micro_usd=gate.spent_micro_usd,
        allowance_micro_usd=gate.allowance_micro_usd,
        resets_at=gate.until.astimezone(UTC).isoformat(),
        top_up=TOP_UP_HINT,
    )


async def start(
    rt: Wiring,
    me: Caller,
    tier: Tier,
    response: Response,
    *,
    idea_brief: str,
    understanding_qna: list[QnA],
    limits: BuildLimits | None,
    idempotency_key: str | None,
    project: tuple[str, int] | None = None,
    project_asked: tuple[str, int | None] | None = None,
    fork: ForkOrigin | None = None,
    fork_asked: dict[str, object] | None = None,
) -> Build:
    """``builds.create_build`` for the caller , its refusals as HTTP
    errors (429 used up or at the cap, 409 on another request with the same Idempotency-Key,
    503 if not queued yet); 200 instead of 201 for the build an Idempotency-Key made before."""
    try:
        made, created = await builds.create_build(
            rt.store,
            rt.publish,
            me,
            idea_brief=idea_brief,
            understanding_qna=understanding_qna,
            limits=limits,
            idempotency_key=idempotency_key,
            cap=tier.concurrent_builds,
            project=project,
            project_asked=project_asked,
            gate=await gate(rt, me.user_id),
            fork=fork,
            fork_asked=fork_asked,
        )
    except builds.AllowanceUsedUp as err:
        raise used_up(err.gate) from err
    except builds.IdempotencyConflict as err:
        raise HTTPException(409, str(err)) from err
    except builds.TooManyBuilds as err:
        raise HTTPException(429, str(err), headers={"Retry-After": "30"}) from err
    except builds.PublishFailed as err:
        raise HTTPException(
            503,
            f"{err}; it will be started shortly, or retry with the same Idempotency-Key",
            headers={"Retry-After": "2"},
        ) from err
    if created:
        BUILDS_CREATED.labels(me.tier).inc()
    else:
        response.status_code = 200
    return made
