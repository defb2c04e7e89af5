"""The watchdog: every ``interval_s`` (with jitter), one indexed query for the builds that have
stopped moving (``CheckpointStore.idle``), and a nudge for each (``stalls``: retried, then
failed). Every replica sweeps; the nudge is a save on the version the sweep saw, so two replicas
finding the same build nudge it once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from .loop import Agent
from .stalls import Watch

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, agent: Agent, watch: Watch, *, interval_s: float, batch: int = 100):
        self.agent = agent
        self.watch = watch
        self.interval_s = interval_s
        self.batch = batch
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> int:
        """Nudge the builds idle now; how many were found."""
        found = await self.agent.store.idle(self.watch.idle_s, self.batch)
        for idle in found:
            try:
                await self.agent.nudge(idle, self.watch)
            except Exception as err:  # the next sweep tries again
                log.warning("could not nudge the build: %s", err, extra={"build_id": idle.build_id})
        return len(found)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s * random.uniform(0.5, 1.5))
            try:
                await self.sweep()
            except Exception:
                log.warning("the watchdog's sweep failed", exc_info=True)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
