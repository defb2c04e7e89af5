"""The snapshot's subscribers: CheckpointSaved on the stream, restore plans over request/reply."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from kiln_contracts import CheckpointSaved, subjects
from kiln_contracts.rpc import RestorePlanReply, RestorePlanRequest
from kiln_runtime.bus import Bus, Delivery

from . import snapshots
from .snapshots import Deps

log = logging.getLogger(__name__)

RESTORE_QUEUE = "snapshot"


def register(bus: Bus, deps: Deps, *, max_workers: int = 8) -> None:
    async def on_checkpoint_saved(event: CheckpointSaved, delivery: Delivery) -> None:
        """Snapshot the build's workspace to S3 and publish SnapshotSaved."""
        await snapshots.take_snapshot(deps, event, delivery.stream_seq)

    bus.consume(CheckpointSaved, on_checkpoint_saved, max_workers=max_workers)


async def answer_restore_plan(deps: Deps, data: bytes) -> RestorePlanReply:
    """A reply for every request: invalid input and failures come back as ok=False."""
    try:
        request = RestorePlanRequest.model_validate_json(data)
    except ValidationError as err:
        return RestorePlanReply(ok=False, error=f"invalid RestorePlanRequest: {err}")
    try:
        return await snapshots.restore_plan(deps, request)
    except Exception as err:
        log.exception("restore plan failed", extra={"build_id": request.build_id})
        return RestorePlanReply(ok=False, error=f"restore plan failed: {type(err).__name__}: {err}")


async def serve_restore_plans(nc: Client, deps: Deps) -> Subscription:
    """Answer RestorePlanRequests on SNAPSHOT_RESTORE_PLAN (queue group "snapshot"), concurrently."""
    tasks: set[asyncio.Task[None]] = set()

    async def respond(msg: Msg) -> None:
        reply = await answer_restore_plan(deps, msg.data)
        if msg.reply:
            await msg.respond(reply.model_dump_json().encode())

    async def on_request(msg: Msg) -> None:
        task = asyncio.create_task(respond(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return await nc.subscribe(subjects.SNAPSHOT_RESTORE_PLAN, queue=RESTORE_QUEUE, cb=on_request)
