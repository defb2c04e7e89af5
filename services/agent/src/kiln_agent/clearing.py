"""Clearing published outboxes in their rows, off the handlers' path and many at once.

A step's outbox is written with its checkpoint; once published it only needs clearing so that the
next read of the row does not publish it again. Nothing waits for that: a handler hands the
(build, version) over and goes on, and the marks that gather within ``delay_s`` are cleared by one
write. A mark not yet written when the process dies, or whose write fails, leaves the outbox in its
row: the next read of the build publishes it again under the same event ids (the outbox's usual
crash case), and the build's next save replaces it anyway. The version guard makes a late mark
for a build that moved on a no-op. Until a mark is written, a read of the row on this replica
is told the outbox was published (``unsent``), so it does not publish it again.
"""

from __future__ import annotations

import asyncio
import logging

from .checkpoint import Checkpoint
from .ports import CheckpointStore

log = logging.getLogger(__name__)


class Clearing:
    def __init__(self, store: CheckpointStore, *, delay_s: float = 0.01) -> None:
        self.store = store
        self.delay_s = delay_s
        self.pending: dict[str, int] = {}  # build → the version whose outbox was published
        self.writing: dict[str, int] = {}  # the marks of the write under way
        self._task: asyncio.Task[None] | None = None

    def add(self, build_id: str, version: int) -> None:
        self.pending[build_id] = max(version, self.pending.get(build_id, 0))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())

    def unsent(self, cp: Checkpoint) -> Checkpoint:
        """``cp`` as read from the row, without an outbox this replica has published already."""
        if cp.outbox and cp.version in (
            self.pending.get(cp.build_id),
            self.writing.get(cp.build_id),
        ):
            cp.outbox = []
        return cp

    async def settle(self) -> None:
        """Wait until every mark handed over so far is written (or its write has failed)."""
        while self._task is not None:
            await asyncio.shield(self._task)

    async def _drain(self) -> None:
        try:
            while self.pending:
                await asyncio.sleep(self.delay_s)
                self.writing, self.pending = self.pending, {}
                try:
                    await self.store.mark_sent(self.writing)
                except Exception as err:  # the outboxes stay in their rows: republished
                    log.warning("could not clear %d outboxes: %s", len(self.writing), err)
                self.writing = {}
        finally:
            self._task = None
