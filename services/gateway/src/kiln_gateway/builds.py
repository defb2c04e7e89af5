"""The gateway's domain: API keys and creating builds (the event that starts one, its
idempotency, its publication and the republishing of those that failed).

Plain async functions over the ports; no web framework and no broker here. Users' messages to
builds are in ``messages``, the read model in ``projection``, the SSE history in ``history``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import replace
from datetime import UTC, datetime

from kiln_contracts import BudgetGate, BuildLimits, BuildRequested, ForkOrigin, QnA, stable_id

from .model import Build, Caller, NewBuild
from .ports import BuildStore, Publish

log = logging.getLogger(__name__)


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request."""


class TooManyBuilds(Exception):
    def __init__(self, cap: int) -> None:
        super().__init__(f"your tier allows {cap} concurrent build(s); wait for one to finish")
        self.cap = cap


class AllowanceUsedUp(Exception):
    """The user's budget gate is closed: no build starts until the reset or a top-up."""

    def __init__(self, gate: BudgetGate) -> None:
        super().__init__(gate.refusal())
        self.gate = gate


class PublishFailed(Exception):
    """The build is stored but could not be handed to the bus yet; it will be republished."""

    def __init__(self, build_id: str) -> None:
        super().__init__(f"build {build_id} is stored but could not be queued yet; retry")
        self.build_id = build_id


def key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def request_digest(
    idea_brief: str,
    qna: list[QnA],
    limits: BuildLimits | None,
    project: tuple[str, int | None] | None = None,
    fork: dict[str, object] | None = None,
) -> str:
    """The request's fingerprint; for a project build, the project and the version *asked for*
    (an Idempotency-Key replay after the project was edited still returns the same build); for
    a fork, what was asked (source and iteration or snapshot)."""
    doc: dict[str, object] = {"limits": limits.model_dump(mode="json") if limits else None}
    if fork is not None:
        doc["fork"] = fork
    elif project is None:
        doc["idea_brief"] = idea_brief
        doc["understanding_qna"] = [q.model_dump(mode="json") for q in qna]
    else:
        doc["project"] = list(project)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------- API keys


async def authenticate(store: BuildStore, api_key: str | None) -> Caller | None:
    if not api_key:
        return None
    return await store.caller_for_key(key_digest(api_key))


async def ensure_dev_key(store: BuildStore, api_key: str, user_id: str, tier: str) -> None:
    await store.upsert_key(key_digest(api_key), user_id, tier)


# ---------------------------------------------------------------------------- creating builds


def build_requested(build: Build) -> BuildRequested:
    """The event that starts ``build``; the same event (same id) every time it is published."""
    return BuildRequested(
        event_id=stable_id(build.build_id, BuildRequested.kind),
        build_id=build.build_id,
        user_id=build.user_id,
        occurred_at=build.created_at,
        tier=build.tier,
        idea_brief=build.idea_brief,
        understanding_qna=[QnA.model_validate(q) for q in build.understanding_qna],
        limits=BuildLimits.model_validate(build.limits),
        fork=fork_origin(build),
    )


def qna_of(build: Build) -> list[QnA]:
    return [QnA.model_validate(q) for q in build.understanding_qna]


def limits_of(build: Build) -> BuildLimits:
    return BuildLimits.model_validate(build.limits)


def fork_origin(build: Build) -> ForkOrigin | None:
    """Where a forked build starts from (None: it is no fork)."""
    if build.fork_of is None:
        return None
    return ForkOrigin(
        build_id=build.fork_of,
        iteration=build.fork_iteration or 0,
        snapshot_id=build.fork_snapshot_id,
    )


async def create_build(
    store: BuildStore,
    publish: Publish,
    caller: Caller,
    *,
    idea_brief: str,
    understanding_qna: list[QnA],
    limits: BuildLimits | None,
    idempotency_key: str | None,
    cap: int,
    project: tuple[str, int] | None = None,
    project_asked: tuple[str, int | None] | None = None,
    gate: BudgetGate | None = None,
    now: datetime | None = None,
    fork: ForkOrigin | None = None,
    fork_asked: dict[str, object] | None = None,
) -> tuple[Build, bool]:
    """Store a build, then publish its BuildRequested. Returns (build, created).

    The row is written first, so a failed publish never loses the build: a retry with the same
    Idempotency-Key republishes it, and so does the periodic ``republish_pending``. Behind the
    user's closed budget ``gate`` nothing new is stored (AllowanceUsedUp); a retry of a build
    created before still gets it.
    """
    closed = gate is not None and gate.closed_at(now or datetime.now(UTC))
    digest = request_digest(idea_brief, understanding_qna, limits, project_asked, fork_asked)
    new = NewBuild(
        build_id=uuid.uuid4().hex,
        user_id=caller.user_id,
        tier=caller.tier,
        idea_brief=idea_brief,
        understanding_qna=[q.model_dump(mode="json") for q in understanding_qna],
        limits=(limits or BuildLimits()).model_dump(mode="json"),
        idempotency_key=idempotency_key,
        request_sha256=digest,
        project_id=project[0] if project else None,
        project_version=project[1] if project else None,
        fork_of=fork.build_id if fork else None,
        fork_iteration=fork.iteration if fork else None,
        fork_snapshot_id=fork.snapshot_id if fork else None,
    )
    # closed: a cap of 0 admits none, while an Idempotency-Key retry still finds its build
    inserted = await store.insert_build(new, cap=0 if closed else cap)
    if inserted.outcome == "capped":
        if closed:
            assert gate is not None
            raise AllowanceUsedUp(gate)
        raise TooManyBuilds(cap)
    build = inserted.build
    assert build is not None
    if inserted.outcome == "existing" and build.request_sha256 != digest:
        raise IdempotencyConflict(
            "this Idempotency-Key was already used with a different request body"
        )
    if build.published_at is None:
        await _publish(store, publish, build)
        build = replace(build, published_at=build.created_at)
    return build, inserted.outcome == "created"


async def _publish(store: BuildStore, publish: Publish, build: Build) -> None:
    try:
        await publish(build_requested(build))
    except Exception as err:
        log.warning(
            "could not publish build_requested: %s", err, extra={"build_id": build.build_id}
        )
        raise PublishFailed(build.build_id) from err
    await store.mark_published(build.build_id)


async def republish_pending(store: BuildStore, publish: Publish, older_than_s: float) -> int:
    """Publish the builds whose publish failed; the stable event id makes a repeat harmless."""
    count = 0
    for build in await store.unpublished(older_than_s):
        try:
            await _publish(store, publish, build)
            count += 1
        except PublishFailed:
            break
    return count
