"""The call ledger's side of running a tool call: the replica's lease on it, renewed while it
runs, and its result stored through a store outage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from kiln_contracts import ToolCall, ToolResult
from kiln_runtime.retry import retry

from .records import CallStore

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def renewing(
    calls: CallStore, call: ToolCall, owner: str, lease_s: float
) -> AsyncIterator[None]:
    """Renew ``owner``'s lease on the call every third of the lease while it runs.

    Nothing is started for a tool that finishes within the first third (most do): a timer
    starts the renewing task then.
    """

    async def renew() -> None:
        while True:
            try:
                await calls.renew(call.build_id, call.call_id, owner, lease_s)
            except Exception:
                log.warning("could not renew the lease on %s", call.call_id, exc_info=True)
            await asyncio.sleep(lease_s / 3)

    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    timer = loop.call_later(lease_s / 3, lambda: tasks.append(loop.create_task(renew())))
    try:
        yield
    finally:
        timer.cancel()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# Tries at storing a call's result before giving up on it (full-jitter backoff capped at 5 s:
# about two minutes on average).
RECORD_ATTEMPTS = 50


async def record_result(calls: CallStore, call: ToolCall, result: ToolResult) -> None:
    """Store the result of a call that ran. While the store cannot be reached (Postgres down
    or failing over) this keeps trying, for about two minutes (RECORD_ATTEMPTS), holding the
    message (it is heartbeated): a call that ran and whose result was lost would be answered as
    interrupted on its redelivery, the work it did unknown to the model."""
    await retry(
        lambda: calls.finish(call.build_id, call.call_id, result.model_dump(mode="json")),
        attempts=RECORD_ATTEMPTS,
        retry_on=(Exception,),
        base=0.5,
        cap=5.0,
        on_retry=lambda err, n: log.warning(
            "could not store the result of %s (attempt %d): %s; trying again",
            call.call_id,
            n,
            err,
            extra={"build_id": call.build_id, "call_id": call.call_id},
        ),
    )
