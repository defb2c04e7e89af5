"""The HTTP API: validate, authenticate, delegate to the domain."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, Security
from fastapi.responses import StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from kiln_contracts import CancelRequested, WakeRequested

from . import builds
from .bootstrap import Runtime
from .model import STATUSES, Build, Caller
from .schemas import Accepted, BuildList, BuildOut, CreateBuild, Problem

BUILDS_CREATED = Counter("kiln_gateway_builds_created_total", "Builds created", ["tier"])

router = APIRouter()
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False)

NOT_FOUND = HTTPException(404, "build not found")
Status = Literal["queued", "running", "sleeping", "completed", "failed", "cancelled"]
assert set(Status.__args__) == set(STATUSES)  # type: ignore[attr-defined]


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


Rt = Annotated[Runtime, Depends(runtime)]


async def caller(
    rt: Rt,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key)],
) -> Caller:
    key = bearer.credentials if bearer else api_key
    who = await builds.authenticate(rt.store, key)
    if who is None:
        raise HTTPException(
            401,
            "missing or unknown API key" if key else "missing API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return who


Me = Annotated[Caller, Depends(caller)]


async def owned_build(build_id: str, rt: Rt, me: Me) -> Build:
    """The caller's build; another user's build does not exist for them (404, never 403)."""
    build = await rt.store.get(build_id) if len(build_id) <= 64 else None
    if build is None or build.user_id != me.user_id:
        raise NOT_FOUND
    return build


Owned = Annotated[Build, Depends(owned_build)]


# ---------------------------------------------------------------------------- builds


@router.post(
    "/v1/builds",
    status_code=201,
    response_model=BuildOut,
    responses={
        200: {"model": BuildOut, "description": "Same Idempotency-Key: the existing build"},
        409: {"model": Problem},
        429: {"model": Problem},
        503: {"model": Problem},
    },
)
async def create_build(
    body: CreateBuild,
    rt: Rt,
    me: Me,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> BuildOut:
    """Start a build. Send an Idempotency-Key to make retries safe."""
    try:
        tier = rt.config.tier(me.tier)
    except KeyError as err:
        raise HTTPException(403, f"your API key's tier {me.tier!r} is not configured") from err
    try:
        build, created = await builds.create_build(
            rt.store,
            rt.publish,
            me,
            idea_brief=body.idea_brief,
            understanding_qna=body.understanding_qna,
            limits=body.limits,
            idempotency_key=idempotency_key,
            cap=tier.concurrent_builds,
        )
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
    return BuildOut.of(build)


def _cursor(build: Build) -> str:
    raw = json.dumps([build.created_at.isoformat(), build.build_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, build_id = json.loads(raw)
        return datetime.fromisoformat(created), str(build_id)
    except (binascii.Error, ValueError, TypeError) as err:
        raise HTTPException(400, "invalid cursor") from err


@router.get("/v1/builds", response_model=BuildList)
async def list_builds(
    rt: Rt,
    me: Me,
    status: Status | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> BuildList:
    """The caller's builds, newest first."""
    before = _parse_cursor(cursor) if cursor else None
    page = await rt.store.list_for_user(me.user_id, status=status, limit=limit + 1, before=before)
    more = len(page) > limit
    page = page[:limit]
    return BuildList(
        builds=[BuildOut.of(b, detail=False) for b in page],
        next_cursor=_cursor(page[-1]) if more and page else None,
    )


@router.get("/v1/builds/{build_id}", response_model=BuildOut, responses={404: {"model": Problem}})
async def get_build(build: Owned) -> BuildOut:
    return BuildOut.of(build)


@router.get(
    "/v1/builds/{build_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, 404: {"model": Problem}},
)
async def build_events(
    build: Owned,
    rt: Rt,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """The build's events as Server-Sent Events: its history, then live, until it ends.

    Each event's ``id`` is its stream sequence; reconnect with ``Last-Event-ID`` to resume.
    """
    after = 0
    if last_event_id is not None and last_event_id.strip():
        try:
            after = int(last_event_id)
        except ValueError:
            raise HTTPException(400, "Last-Event-ID must be an integer stream sequence") from None
        if after < 0:
            raise HTTPException(400, "Last-Event-ID must not be negative")
    stream = builds.event_stream(rt.events, build, after, rt.settings.sse_heartbeat_s)
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _command(
    rt: Runtime, build: Build, what: str, msg: CancelRequested | WakeRequested
) -> Accepted:
    if build.state.terminal:
        raise HTTPException(409, f"build is already {build.status}; nothing to {what}")
    try:
        await rt.publish(msg)
    except Exception as err:
        raise HTTPException(503, f"could not send the {what} request; retry") from err
    return Accepted(build_id=build.build_id, requested=what)


@router.post(
    "/v1/builds/{build_id}/cancel",
    status_code=202,
    response_model=Accepted,
    responses={404: {"model": Problem}, 409: {"model": Problem}},
)
async def cancel_build(build: Owned, rt: Rt, me: Me) -> Accepted:
    msg = CancelRequested(build_id=build.build_id, user_id=me.user_id, reason="cancelled by user")
    return await _command(rt, build, "cancel", msg)


@router.post(
    "/v1/builds/{build_id}/wake",
    status_code=202,
    response_model=Accepted,
    responses={404: {"model": Problem}, 409: {"model": Problem}},
)
async def wake_build(build: Owned, rt: Rt, me: Me) -> Accepted:
    msg = WakeRequested(build_id=build.build_id, user_id=me.user_id, reason="woken by user")
    return await _command(rt, build, "wake", msg)


# ---------------------------------------------------------------------------- operations


@router.get("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> Response:
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    ok = rt is not None and await rt.ready()
    return Response(
        json.dumps({"status": "ready" if ok else "not ready"}),
        status_code=200 if ok else 503,
        media_type="application/json",
    )


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
