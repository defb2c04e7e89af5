"""The call ledger's side of running a tool call: the replica's lease on it, renewed while it
runs. (Its result, stored after it, waits out a store outage: ``PgCallStore.finish``.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from kiln_contracts import ToolCall

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
