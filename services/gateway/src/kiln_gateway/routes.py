"""The builds API and operations: validate, authenticate, delegate to the domain."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import math
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from kiln_contracts import BudgetGate, CancelRequested, QnA, WakeRequested
from kiln_contracts.gates import TOP_UP_HINT
from kiln_runtime import metrics as kiln_metrics

from . import accounts, archive, builds, projects, snapshots
from .bootstrap import Wiring
from .deps import Key, Me, Owned, Rt, build_of, unauthorized
from .model import STATUSES, Build
from .problems import ProblemError, responses
from .schemas import (
    Accepted,
    BuildList,
    BuildOut,
    CreateBuild,
    MessageOut,
    SendMessage,
    StreamToken,
)

log = logging.getLogger(__name__)

BUILDS_CREATED = Counter("kiln_gateway_builds_created_total", "Builds created", ["tier"])

router = APIRouter()

Status = Literal["queued", "running", "sleeping", "completed", "failed", "cancelled", "rejected"]
assert set(Status.__args__) == set(STATUSES)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- builds


@router.post(
    "/v1/builds",
    status_code=201,
    response_model=BuildOut,
    tags=["builds"],
    responses={
        200: {"model": BuildOut, "description": "Same Idempotency-Key: the existing build"},
        **responses(401, 403, 404, 409, 413, 422, 429, 503),
    },
)
async def create_build(
    body: CreateBuild,
    rt: Rt,
    me: Me,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> BuildOut:
    """Start a build, from an idea brief given inline or from a project (a version of it).

    Send an ``Idempotency-Key`` to make retries safe. At the tier's concurrent-build cap: 429
    with ``Retry-After``. When the allowance is used up: 429, problem type
    ``allowance-used-up`` (what is spent, when it resets, how to top up) with ``Retry-After``
    = the seconds until the reset.
    """
    try:
        tier = rt.config.tier(me.tier)
    except KeyError as err:
        raise HTTPException(403, f"your API key's tier {me.tier!r} is not configured") from err
    project = asked = None
    if body.project_id is not None:
        try:
            p = await projects.get(rt.store, me, body.project_id, body.project_version)
        except projects.ProjectNotFound as err:
            raise HTTPException(404, str(err)) from err
        brief, qna = p.idea_brief, [QnA.model_validate(q) for q in p.understanding_qna]
        project, asked = (p.project_id, p.version), (p.project_id, body.project_version)
    else:
        assert body.idea_brief is not None
        brief, qna = body.idea_brief, body.understanding_qna or []
    try:
        build, created = await builds.create_build(
            rt.store,
            rt.publish,
            me,
            idea_brief=brief,
            understanding_qna=qna,
            limits=body.limits,
            idempotency_key=idempotency_key,
            cap=tier.concurrent_builds,
            project=project,
            project_asked=asked,
            gate=await _gate(rt, me.user_id),
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
    return BuildOut.of(build)


async def _gate(rt: Wiring, user_id: str) -> BudgetGate | None:
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


def encode_cursor(created_at: datetime, ident: str) -> str:
    raw = json.dumps([created_at.isoformat(), ident]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, ident = json.loads(raw)
        return datetime.fromisoformat(created), str(ident)
    except (binascii.Error, ValueError, TypeError) as err:
        raise HTTPException(400, "invalid cursor") from err


@router.get(
    "/v1/builds", response_model=BuildList, tags=["builds"], responses=responses(400, 401, 422)
)
async def list_builds(
    rt: Rt,
    me: Me,
    status: Annotated[Status | None, Query(description="Only builds in this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> BuildList:
    """The caller's builds, newest first, a page at a time."""
    before = decode_cursor(cursor) if cursor else None
    page = await rt.store.list_for_user(me.user_id, status=status, limit=limit + 1, before=before)
    more = len(page) > limit
    page = page[:limit]
    return BuildList(
        builds=[BuildOut.of(b, detail=False) for b in page],
        next_cursor=encode_cursor(page[-1].created_at, page[-1].build_id) if more else None,
    )


@router.get(
    "/v1/builds/{build_id}",
    response_model=BuildOut,
    tags=["builds"],
    responses=responses(401, 404),
)
async def get_build(build: Owned) -> BuildOut:
    return BuildOut.of(build)


def _after(last_event_id: str | None) -> int:
    if last_event_id is None or not last_event_id.strip():
        return 0
    try:
        after = int(last_event_id)
    except ValueError:
        raise HTTPException(400, "Last-Event-ID must be an integer stream sequence") from None
    if after < 0:
        raise HTTPException(400, "Last-Event-ID must not be negative")
    return after


@router.get(
    "/v1/builds/{build_id}/events",
    response_class=StreamingResponse,
    tags=["builds"],
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
        **responses(400, 401, 404),
    },
)
async def build_events(
    build_id: str,
    rt: Rt,
    key: Key,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
    token: Annotated[
        str | None,
        Query(
            max_length=1000,
            description="A stream token (POST .../events/token) instead of the API key, for "
            "browsers' EventSource, which cannot send headers.",
        ),
    ] = None,
    last_event_id_q: Annotated[
        str | None,
        Query(
            alias="last_event_id",
            max_length=40,
            description="Resume after this stream sequence (if no Last-Event-ID header).",
        ),
    ] = None,
) -> StreamingResponse:
    """The build's events as Server-Sent Events: its history, then live, until it ends.

    Each event's ``id`` is its stream sequence; reconnect with ``Last-Event-ID`` to resume. A
    ``: heartbeat`` comment is sent while nothing happens.
    """
    me = await builds.authenticate(rt.store, key) if key else None
    if me is None and token:
        me = accounts.check_stream_token(rt.token_secret, token, build_id)
    if me is None:
        raise unauthorized(key)
    build = await build_of(rt, me, build_id)
    after = _after(last_event_id if last_event_id is not None else last_event_id_q)
    stream = builds.event_stream(rt.events, build, after, rt.settings.sse_heartbeat_s)
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/v1/builds/{build_id}/events/token",
    response_model=StreamToken,
    tags=["builds"],
    responses=responses(401, 404),
)
async def stream_token(build: Owned, rt: Rt, me: Me) -> StreamToken:
    """A short-lived token for this build's event stream (for a browser's EventSource)."""
    token, expires = accounts.stream_token(
        rt.token_secret, me, build.build_id, rt.settings.stream_token_ttl_s
    )
    return StreamToken(
        token=token, expires_at=expires, events_url=f"/v1/builds/{build.build_id}/events"
    )


async def _command(
    rt: Wiring, build: Build, what: str, msg: CancelRequested | WakeRequested
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
    tags=["builds"],
    responses=responses(401, 404, 409, 503),
)
async def cancel_build(build: Owned, rt: Rt, me: Me) -> Accepted:
    msg = CancelRequested(build_id=build.build_id, user_id=me.user_id, reason="cancelled by user")
    return await _command(rt, build, "cancel", msg)


@router.post(
    "/v1/builds/{build_id}/wake",
    status_code=202,
    response_model=Accepted,
    tags=["builds"],
    responses=responses(401, 404, 409, 503),
)
async def wake_build(build: Owned, rt: Rt, me: Me) -> Accepted:
    msg = WakeRequested(build_id=build.build_id, user_id=me.user_id, reason="woken by user")
    return await _command(rt, build, "wake", msg)


@router.post(
    "/v1/builds/{build_id}/messages",
    status_code=202,
    response_model=MessageOut,
    tags=["builds"],
    responses=responses(401, 403, 404, 409, 413, 422, 429, 503),
)
async def send_message(
    body: SendMessage,
    build: Owned,
    rt: Rt,
    me: Me,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> MessageOut:
    """Write to a build. A running build reads the message at its next think (after the tool
    results it is waiting for, or the model call it is making); a sleeping one when it wakes; a
    completed, failed or cancelled one continues with it: its conversation kept, its files
    restored into a fresh sandbox from its latest snapshot, a new allowance of iterations and
    cost. Continuing a build counts towards the tier's concurrent builds (429 at the cap).

    Messages are taken in the order they are accepted here (``seq``), each once. Send an
    ``Idempotency-Key`` to make retries safe: the same key is the same message; with another
    text, 409.
    """
    if build.status == "rejected":
        raise HTTPException(
            409, "this build was refused before it started (no allowance left): start a new build"
        )
    try:
        tier = rt.config.tier(me.tier)
    except KeyError as err:
        raise HTTPException(403, f"your API key's tier {me.tier!r} is not configured") from err
    try:
        message, _ = await builds.send_message(
            rt.store,
            rt.publish,
            me,
            build,
            text=body.text,
            idempotency_key=idempotency_key,
            cap=tier.concurrent_builds,
        )
    except builds.IdempotencyConflict as err:
        raise HTTPException(409, str(err)) from err
    except builds.TooManyBuilds as err:
        raise HTTPException(
            429, f"{err} before continuing this one", headers={"Retry-After": "30"}
        ) from err
    except builds.MessagePublishFailed as err:
        raise HTTPException(
            503,
            "the message is stored but could not be sent yet; it will be sent shortly, or retry "
            "with the same Idempotency-Key",
            headers={"Retry-After": "2"},
        ) from err
    return MessageOut.of(message)


@router.get(
    "/v1/builds/{build_id}/files",
    response_class=StreamingResponse,
    tags=["builds"],
    responses={
        200: {
            "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The latest snapshot's files as a tar.gz (streamed)",
        },
        **responses(401, 404, 410, 503),
    },
)
async def build_files(build: Owned, rt: Rt) -> StreamingResponse:
    """The build's files, directories and symlinks, as its latest snapshot holds them, as a
    streamed ``.tar.gz``."""
    try:
        latest = await rt.files.latest(build.build_id)
    except Exception as err:
        log.warning("snapshot store unavailable: %s", err, extra={"build_id": build.build_id})
        raise HTTPException(503, "the snapshot store is unavailable; retry") from err
    if latest is None:
        raise HTTPException(*snapshots.missing(build.build_id, build.state.last_snapshot_id))
    mtime = int(build.updated_at.timestamp())
    name = f"kiln-{build.build_id}"
    return StreamingResponse(
        archive.tar_gz(latest, rt.files.blob, root=name, mtime=mtime),
        media_type="application/gzip",
        headers={
            "Content-Disposition": f'attachment; filename="{name}.tar.gz"',
            "X-Kiln-Snapshot-Id": latest.snapshot_id,
        },
    )


# ---------------------------------------------------------------------------- operations


def _status(problems: list[str], good: str, bad: str) -> Response:
    return Response(
        json.dumps({"status": bad if problems else good, "problems": problems}),
        status_code=503 if problems else 200,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


@router.get("/healthz", include_in_schema=False)
async def healthz(request: Request) -> Response:
    """Live: the event loop answers (this is served by it) and the bus is not broken for good."""
    rt: Wiring | None = getattr(request.app.state, "runtime", None)
    problems = list(rt.bus_problems().not_live) if rt is not None else []
    return _status(problems, "ok", "not live")


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> Response:
    """Ready: started, connected to NATS, consuming, and Postgres answers."""
    rt: Wiring | None = getattr(request.app.state, "runtime", None)
    problems = await rt.not_ready() if rt is not None else ["starting or shutting down"]
    return _status(problems, "ready", "not ready")


@router.get("/metrics", include_in_schema=False)
async def metrics(rt: Rt) -> Response:
    with contextlib.suppress(Exception):  # the figure is skipped, not the scrape, if PG is down
        kiln_metrics.BUILDS_SLEEPING.set(await rt.store.count_with_status("sleeping"))
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
