"""Restore plans (what a fresh sandbox downloads, from a build's latest snapshot or a fork's
source) and forks' first snapshots (a copy of the source's manifest: the same blobs, nothing
uploaded). The bucket's rules are in ``snapshots``' docstring."""

from __future__ import annotations

import logging

from pydantic import ValidationError

from kiln_contracts import BuildRequested, ForkOrigin, SnapshotSaved, stable_id
from kiln_contracts.bucket import (
    blob_key,
    fork_ref_key,
    latest_key,
    manifest_key,
    manifests_prefix,
)
from kiln_contracts.manifest import ForkedFrom, Manifest, ManifestEntry
from kiln_contracts.messages import utcnow
from kiln_contracts.rpc import (
    Download,
    RestorePlanReply,
    RestorePlanRequest,
)
from kiln_runtime.errors import PermanentError

from .manifests import (
    ORDER_META,
    advance_latest,
    load_manifest,
    pruned_iteration,
    tag_iteration,
    write_manifest,
)
from .ports import ObjectStore
from .snapshots import Deps, pending_marker

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ restore


async def restore_plan(deps: Deps, request: RestorePlanRequest) -> RestorePlanReply:
    """The latest snapshot's files with presigned GET URLs, its directories and its symlinks
    (those leading outside the workspace left out and listed in ``skipped``).

    ok=False with error "no snapshot" (and no snapshot_id) only when the build has none; a
    snapshot that exists but cannot be read comes back ok=False *with* its snapshot_id.
    """
    latest = await deps.store.get(latest_key(request.build_id))
    if latest is None and request.fork is not None:
        # a fork with no snapshot of its own yet: its first one is its source's, copied now
        try:
            seeded = await seed_fork(deps, request.build_id, None, request.fork)
        except ForkSourceMissing as err:
            return RestorePlanReply(ok=False, snapshot_id="?", error=str(err))
        latest = seeded.snapshot_id.encode() if seeded is not None else None
    if latest is None:
        return RestorePlanReply(ok=False, error="no snapshot")
    snapshot_id = latest.decode()
    try:
        doc = await load_manifest(deps.store, request.build_id, snapshot_id)
        if doc is None:
            raise KeyError(f"manifest {snapshot_id} is missing")
    except (KeyError, ValueError, ValidationError) as err:
        return RestorePlanReply(
            ok=False, snapshot_id=snapshot_id, error=f"unreadable snapshot: {err}"
        )
    files = [
        Download(
            path=e.path,
            sha256=e.sha256,
            mode=e.mode,
            url=await deps.store.presign_get(blob_key(e.sha256)),
        )
        for e in doc.entries
    ]
    skipped = doc.escaping_symlinks()
    outside = set(skipped)
    return RestorePlanReply(
        ok=True,
        snapshot_id=snapshot_id,
        files=files,
        dirs=[ManifestEntry.directory(d.path, d.mode) for d in doc.dirs],
        symlinks=[
            ManifestEntry.symlink(s.path, s.target) for s in doc.symlinks if s.path not in outside
        ],
        skipped=skipped,
    )


# ------------------------------------------------------------------------------ forks


class ForkSourceMissing(Exception):
    """The snapshot a fork starts from is not there (unknown, another user's, or deleted)."""


def fork_snapshot_id(build_id: str, origin: ForkOrigin) -> str:
    """The id of a fork's first snapshot: the same for every writer of it."""
    return str(stable_id(build_id, "fork", origin.build_id, origin.iteration, origin.snapshot_id))


async def resolve(store: ObjectStore, build_id: str, iteration: int) -> Manifest | None:
    """The newest manifest of ``build_id`` with an iteration <= ``iteration`` (the files as they
    were at that iteration: snapshots are taken when files changed); None when the build took
    none by then. ForkSourceMissing when retention may have deleted the right one."""
    best: tuple[str, str] | None = None
    for obj in await store.list(manifests_prefix(build_id)):
        tag = ((await store.metadata(obj.key)) or {}).get(ORDER_META, "")
        if tag_iteration(tag) <= iteration and (best is None or tag > best[0]):
            best = (tag, obj.key)
    doc = None
    if best is not None and (raw := await store.get(best[1])) is not None:
        doc = Manifest.parse(raw)
    pruned = await pruned_iteration(store, build_id)
    if pruned is not None and (doc is None or doc.iteration < pruned) and pruned <= iteration:
        raise ForkSourceMissing(
            f"the snapshot of iteration {iteration} of build {build_id} is no longer kept"
        )
    return doc


async def source_manifest(store: ObjectStore, origin: ForkOrigin) -> Manifest | None:
    """The source's manifest a fork starts from (None: it had none by then, an empty workspace)."""
    if origin.snapshot_id is None:
        return await resolve(store, origin.build_id, origin.iteration)
    doc = await load_manifest(store, origin.build_id, origin.snapshot_id)
    if doc is None:
        raise ForkSourceMissing(
            f"build {origin.build_id} has no snapshot {origin.snapshot_id} (any more)"
        )
    return doc


async def seed_fork(
    deps: Deps, build_id: str, user_id: str | None, origin: ForkOrigin
) -> Manifest | None:
    """The fork's first snapshot: its source's manifest copied under the fork (the same blobs,
    content-addressed: nothing is uploaded), ``latest`` pointed at it unless the fork has a newer
    one. Idempotent (a stable snapshot id); None if the source had no snapshot by then.
    ``user_id``: the fork's owner, who must own the source (None: not checked here)."""
    snapshot_id = fork_snapshot_id(build_id, origin)
    async with deps.coalescer.lock(build_id):
        stored = await load_manifest(deps.store, build_id, snapshot_id)
        if stored is not None:
            await advance_latest(deps.store, build_id, stored)
            return stored
        source = await source_manifest(deps.store, origin)
        if source is None:
            return None
        if user_id is not None and source.user_id != user_id:
            raise ForkSourceMissing(f"build {origin.build_id} is not this user's")
        # from here on the source's retention keeps that manifest (checked below: still there)
        await deps.store.put(
            fork_ref_key(origin.build_id, source.snapshot_id, build_id), b"", "text/plain"
        )
        # the GC protocol of a snapshot: a pending marker naming the blobs, no sweep running,
        # and the source still there (its manifest kept the blobs until our marker did)
        async with pending_marker(deps, build_id, snapshot_id, source.blobs(), "fork"):
            if await deps.store.get(manifest_key(source.build_id, source.snapshot_id)) is None:
                raise ForkSourceMissing(f"snapshot {source.snapshot_id} was deleted meanwhile")
            doc = source.model_copy(
                update={
                    "snapshot_id": snapshot_id,
                    "build_id": build_id,
                    "iteration": origin.iteration,
                    "reason": "fork",
                    "created_at": utcnow(),
                    "bytes_uploaded": 0,
                    "forked_from": ForkedFrom(
                        build_id=source.build_id, snapshot_id=source.snapshot_id
                    ),
                }
            )
            await write_manifest(deps.store, doc)
        await advance_latest(deps.store, build_id, doc)
        log.info(
            "fork seeded from snapshot %s of build %s (%d files)",
            source.snapshot_id,
            source.build_id,
            doc.files,
            extra={"build_id": build_id},
        )
        return doc


async def fork_requested(deps: Deps, msg: BuildRequested) -> SnapshotSaved | None:
    """A fork is requested: its first snapshot is its source's, copied at once (the fork's files
    can be downloaded before it ran a tool, and the source's retention no longer matters to it);
    SnapshotSaved (reason ``fork``) says so. A build that is no fork: nothing."""
    if msg.fork is None:
        return None
    try:
        doc = await seed_fork(deps, msg.build_id, msg.user_id, msg.fork)
    except ForkSourceMissing as err:
        raise PermanentError(f"cannot fork: {err}") from err
    if doc is None:
        return None
    saved = msg.caused(
        SnapshotSaved,
        event_id=stable_id(msg.build_id, "snapshot_saved", doc.snapshot_id),
        occurred_at=doc.created_at,
        snapshot_id=doc.snapshot_id,
        iteration=doc.iteration,
        reason="fork",
        files=doc.files,
        bytes_total=doc.bytes_total,
        bytes_uploaded=0,
    )
    await deps.publisher.publish(saved)
    return saved
