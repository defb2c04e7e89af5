"""Forking a build: where the fork starts from (the source's iteration and the snapshot of it).

Plain async functions over the ports, like ``builds``. The fork itself is a build whose
``BuildRequested`` carries ``fork`` (``builds.create_build``): the agent seeds its conversation from
the source's turns up to that iteration, the snapshot service copies the source's snapshot as the
fork's first, and its first sandbox is restored from it.
"""

from __future__ import annotations

from kiln_contracts import ForkOrigin
from kiln_contracts.manifest import Manifest

from . import model
from .model import Build
from .ports import BuildStore, EventSource, SnapshotFiles


class ForkRefused(Exception):
    """The fork cannot be made as asked: ``status`` and ``kind`` for the problem document."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


async def origin(
    store: BuildStore,
    files: SnapshotFiles,
    build: Build,
    *,
    iteration: int | None = None,
    snapshot_id: str | None = None,
    events: EventSource | None = None,
) -> ForkOrigin:
    """Where a fork of the caller's ``build`` at ``iteration`` (or at its snapshot
    ``snapshot_id``) starts: that iteration and the newest snapshot the build took at it or before
    (snapshots are taken when files changed). A fork's own iterations before the one it was forked
    at are its source's: a fork of it there is a fork of the source. ``events``: the stream, to
    make sure that snapshot is not one still being written (the build's checkpoints say which
    snapshots were asked for)."""
    if build.status == model.REJECTED:
        raise ForkRefused(409, "conflict", "this build never started: there is nothing to fork")
    if snapshot_id is not None:
        doc = await files.manifest(build.build_id, snapshot_id)
        if doc is None:
            raise ForkRefused(
                404, "unknown-snapshot", f"build {build.build_id} has no snapshot {snapshot_id}"
            )
        return ForkOrigin(build_id=build.build_id, iteration=doc.iteration, snapshot_id=snapshot_id)
    assert iteration is not None
    if iteration > build.state.iteration:
        raise ForkRefused(
            422,
            "iteration-out-of-range",
            f"build {build.build_id} has reached iteration {build.state.iteration}: fork it at "
            f"an iteration from 0 to {build.state.iteration}",
        )
    if iteration == build.state.iteration and build.status in (model.QUEUED, model.RUNNING):
        # its tool results (and the snapshot of their files) may still be on their way
        raise ForkRefused(
            409,
            "iteration-in-progress",
            f"build {build.build_id} is still working on iteration {iteration}: fork it at an "
            "earlier iteration, or once it has moved on",
        )
    while build.fork_of is not None and iteration < (build.fork_iteration or 0):
        source = await store.get(build.fork_of)
        if source is None or source.user_id != build.user_id:
            break
        build = source
    chosen = newest_at(await _manifests(files, build.build_id), iteration)
    pruned = await files.pruned(build.build_id)
    if pruned is not None and pruned <= iteration and (chosen is None or chosen.iteration < pruned):
        raise ForkRefused(
            410,
            "snapshot-gone",
            f"the snapshot of iteration {iteration} of build {build.build_id} is no longer kept "
            "(retention keeps a build's newest snapshots)",
        )
    if events is not None:
        chosen = await _not_being_written(events, files, build.build_id, iteration, chosen)
    return ForkOrigin(
        build_id=build.build_id,
        iteration=iteration,
        snapshot_id=chosen.snapshot_id if chosen is not None else None,
    )


async def _not_being_written(
    events: EventSource,
    files: SnapshotFiles,
    build_id: str,
    iteration: int,
    chosen: Manifest | None,
) -> Manifest | None:
    """``chosen``, or the snapshot written since it was chosen; refused while a snapshot newer
    than ``chosen`` and at ``iteration`` or before was asked for (a CheckpointSaved) but is not
    written yet (503: retry), or if it never will be (410: a newer checkpoint superseded it, the
    snapshot service snapshots only the newest of a backlog)."""
    asked = [c for c in await events.checkpoints(build_id) if c.iteration <= iteration]
    if not asked:
        return chosen
    wanted = max(asked, key=lambda c: (c.iteration, c.seq))
    if chosen is not None and chosen.iteration >= wanted.iteration:
        return chosen  # that snapshot, or another of the same iteration or later: same files
    if (written := await files.manifest(build_id, wanted.snapshot_id)) is not None:
        return written  # written since the listing
    newer = [m for m in await _manifests(files, build_id) if m.iteration > wanted.iteration]
    if newer:
        raise ForkRefused(
            410,
            "snapshot-gone",
            f"no snapshot of iteration {wanted.iteration} of build {build_id} was kept (a newer "
            "one superseded it); fork at another iteration",
        )
    raise ForkRefused(
        503,
        "snapshot-pending",
        f"the snapshot of iteration {wanted.iteration} of build {build_id} is still being "
        "written; retry in a moment",
    )


async def _manifests(files: SnapshotFiles, build_id: str) -> list[Manifest]:
    return [s.manifest for s in await files.snapshots(build_id)]


def newest_at(manifests: list[Manifest], iteration: int) -> Manifest | None:
    """The newest of ``manifests`` taken at ``iteration`` or before (by iteration, then time)."""
    at = [m for m in manifests if m.iteration <= iteration]
    return max(at, key=lambda m: (m.iteration, m.checkpoint_at), default=None)
