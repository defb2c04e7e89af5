"""``POST /v1/builds/{id}/fork``: a new build from another's conversation and files at one of its
iterations (the domain in ``forks``; the build is created like ``POST /v1/builds``)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Response

from . import builds, forks
from .deps import IdempotencyKey, Me, Owned, Rt
from .problems import ProblemError
from .schemas_builds import BuildOut, ForkBuild
from .starting import post_starting, start, tier_of

log = logging.getLogger(__name__)

router = APIRouter()


@post_starting(
    router,
    "/v1/builds/{build_id}/fork",
    again="Same Idempotency-Key: the fork made before",
    errors=(401, 403, 404, 409, 410, 422, 429, 503),
)
async def fork_build(
    body: ForkBuild,
    build: Owned,
    rt: Rt,
    me: Me,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> BuildOut:
    """Fork the build at an ``iteration`` (or at one of its snapshots, ``snapshot_id``): a new
    build whose conversation is this one's up to there and whose files are the snapshot taken at
    that iteration (the newest at it or before), byte for byte; this build is not touched. The
    fork goes on from there, as a build of its own (its own limits, counted towards the tier's
    concurrent builds). 201 with the new build and its ``Location``.

    ``iteration`` beyond the build's: 422; the iteration a running build is still at: 409; an unknown ``snapshot_id``: 404; a snapshot retention
    no longer keeps (or never kept: a newer one superseded it): 410; one still being written: 503
    with ``Retry-After``. Send an ``Idempotency-Key`` to make retries safe (as for
    ``POST /v1/builds``)."""
    tier = tier_of(rt, me)
    asked: dict[str, object] = {
        "source": build.build_id,
        "iteration": body.iteration,
        "snapshot_id": body.snapshot_id,
    }
    try:
        origin = await forks.origin(
            rt.store,
            rt.files,
            build,
            iteration=body.iteration,
            snapshot_id=body.snapshot_id,
            events=rt.events,
        )
    except forks.ForkRefused as err:
        headers = {"Retry-After": "2"} if err.status == 503 else None
        raise ProblemError(err.status, err.kind, err.detail, headers=headers) from err
    except Exception as err:
        log.warning("snapshot store unavailable: %s", err, extra={"build_id": build.build_id})
        raise HTTPException(
            503, "the snapshot store is unavailable; retry", headers={"Retry-After": "2"}
        ) from err
    fork = await start(
        rt,
        me,
        tier,
        response,
        idea_brief=build.idea_brief,
        understanding_qna=builds.qna_of(build),
        limits=builds.limits_of(build),
        idempotency_key=idempotency_key,
        fork=origin,
        fork_asked=asked,
    )
    response.headers["Location"] = f"/v1/builds/{fork.build_id}"
    return BuildOut.of(fork)
