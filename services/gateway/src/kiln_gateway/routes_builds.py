"""The builds API: start, list and read builds, cancel and wake them, download their files.

The event stream is in ``routes_events``, users' messages in ``routes_messages``, the
operations endpoints in ``routes_ops``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import StreamingResponse
from fastapi.types import DecoratedCallable

from kiln_contracts import CancelRequested, QnA, WakeRequested

from . import archive, projects, snapshots
from .bootstrap import Wiring
from .cursors import Cursor, paged
from .deps import IdempotencyKey, Me, Owned, Rt
from .model import STATUSES, Build
from .problems import responses
from .schemas_builds import Accepted, BuildList, BuildOut, CreateBuild
from .starting import post_starting, start, tier_of

log = logging.getLogger(__name__)

router = APIRouter()

Status = Literal["queued", "running", "sleeping", "completed", "failed", "cancelled", "rejected"]
assert set(Status.__args__) == set(STATUSES)  # type: ignore[attr-defined]


@post_starting(
    router,
    "/v1/builds",
    again="Same Idempotency-Key: the existing build",
    errors=(401, 403, 404, 409, 413, 422, 429, 503),
)
async def create_build(
    body: CreateBuild,
    rt: Rt,
    me: Me,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> BuildOut:
    """Start a build, from an idea brief given inline or from a project (a version of it).

    Send an ``Idempotency-Key`` to make retries safe. At the tier's concurrent-build cap: 429
    with ``Retry-After``. When the allowance is used up: 429, problem type
    ``allowance-used-up`` (what is spent, when it resets, how to top up) with ``Retry-After``
    = the seconds until the reset.
    """
    tier = tier_of(rt, me)
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
    build = await start(
        rt,
        me,
        tier,
        response,
        idea_brief=brief,
        understanding_qna=qna,
        limits=body.limits,
        idempotency_key=idempotency_key,
        project=project,
        project_asked=asked,
    )
    return BuildOut.of(build)


@router.get(
    "/v1/builds", response_model=BuildList, tags=["builds"], responses=responses(400, 401, 422)
)
async def list_builds(
    rt: Rt,
    me: Me,
    status: Annotated[Status | None, Query(description="Only builds in this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Cursor = None,
) -> BuildList:
    """The caller's builds, newest first, a page at a time."""
    page, next_cursor = await paged(
        lambda n, before: rt.store.list_for_user(me.user_id, status=status, limit=n, before=before),
        limit,
        cursor,
        lambda b: (b.created_at, b.build_id),
    )
    return BuildList(builds=[BuildOut.of(b, detail=False) for b in page], next_cursor=next_cursor)


@router.get(
    "/v1/builds/{build_id}",
    response_model=BuildOut,
    tags=["builds"],
    responses=responses(401, 404),
)
async def get_build(build: Owned) -> BuildOut:
    return BuildOut.of(build)


def _post_command(what: str) -> Callable[[DecoratedCallable], DecoratedCallable]:
    """The route of ``POST /v1/builds/{id}/<what>``, a command sent to the build (202)."""
    return router.post(
        f"/v1/builds/{{build_id}}/{what}",
        status_code=202,
        response_model=Accepted,
        tags=["builds"],
        responses=responses(401, 404, 409, 503),
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


@_post_command("cancel")
async def cancel_build(build: Owned, rt: Rt, me: Me) -> Accepted:
    msg = CancelRequested(build_id=build.build_id, user_id=me.user_id, reason="cancelled by user")
    return await _command(rt, build, "cancel", msg)


@_post_command("wake")
async def wake_build(build: Owned, rt: Rt, me: Me) -> Accepted:
    msg = WakeRequested(build_id=build.build_id, user_id=me.user_id, reason="woken by user")
    return await _command(rt, build, "wake", msg)


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
