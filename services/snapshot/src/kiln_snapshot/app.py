"""The snapshot's subscribers: CheckpointSaved on the stream, restore plans over request/reply."""

from __future__ import annotations

import logging
from functools import partial

from kiln_contracts import BuildRequested, CheckpointSaved, subjects
from kiln_contracts.rpc import RestorePlanReply, RestorePlanRequest
from kiln_runtime.bus import Bus, Delivery
from kiln_runtime.rpc import Responder

from . import restores, snapshots
from .snapshots import Deps

log = logging.getLogger(__name__)

RESTORE_QUEUE = "snapshot"


def register(bus: Bus, deps: Deps, *, max_workers: int = 8) -> None:
    async def on_checkpoint_saved(event: CheckpointSaved, delivery: Delivery) -> None:
        """Snapshot the build's workspace to S3 and publish SnapshotSaved."""
        await snapshots.take_snapshot(deps, event, delivery.stream_seq)

    async def on_build_requested(msg: BuildRequested, delivery: Delivery) -> None:
        """A fork: its first snapshot is a copy of its source's (other builds: nothing)."""
        await restores.fork_requested(deps, msg)

    bus.consume(CheckpointSaved, on_checkpoint_saved, max_workers=max_workers)
    bus.consume(BuildRequested, on_build_requested, max_workers=max_workers)


def restore_plan_responder(deps: Deps) -> Responder[RestorePlanRequest, RestorePlanReply]:
    """Answers RestorePlanRequests on SNAPSHOT_RESTORE_PLAN (queue group "snapshot"),
    concurrently."""
    return Responder(
        subjects.SNAPSHOT_RESTORE_PLAN,
        RESTORE_QUEUE,
        RestorePlanRequest,
        RestorePlanReply,
        partial(restores.restore_plan, deps),
        failure="restore plan",
    )
