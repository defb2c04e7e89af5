"""A CheckpointStore in front of the real one that keeps, per build, the turns it read or saved
(committed turns never change) and the checkpoint its last handler of the build was done with, so
that an iteration on the replica that made its calls reads nothing (``kept.py`` holds them, least
recently used dropped past its limits).

The driver sees three things beyond the port: ``recall`` (the kept checkpoint, maybe out of date:
its save checks the version, and a "nothing to do" decided on it is confirmed on a fresh read),
``conversation`` (a checkpoint's turns, only the newer ones fetched) and ``returning`` (a handler
publishing the outbox of a checkpoint it will then be done with). A handler tells the store when
it is ``done`` with a checkpoint; a sleeping or finished build is dropped at once.

The answer to a ToolCall can arrive before the handler that published it has been told the
publish is acknowledged: a recall then waits for that handler to hand the checkpoint back rather
than reading the row it has just written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from .checkpoint import Checkpoint, Turn
from .clearing import Clearing
from .kept import Entry, Kept
from .ports import NO_LEASE_CHANGE, CheckpointStore, Idle, LeaseChange

log = logging.getLogger(__name__)

# The longest a recall waits for a checkpoint being handed back before it reads the row instead.
RETURN_WAIT_S = 1.0


class CachingStore:
    def __init__(self, store: CheckpointStore, *, max_chars: int, max_builds: int) -> None:
        self.store = store
        self.kept = Kept(max_chars, max_builds)
        self.clearing = Clearing(store)
        self._returning: dict[str, asyncio.Event] = {}  # build → set once it is handed back

    # ------------------------------------------------------------------ the port

    async def create(self, cp: Checkpoint, turns: list[Turn]) -> bool:
        return await self.store.create(cp, turns)

    async def load(self, build_id: str) -> Checkpoint | None:
        cp = await self.store.load(build_id)
        return None if cp is None else self.clearing.unsent(cp)

    async def turns(self, build_id: str, since: int = 0) -> list[Turn]:
        return await self.store.turns(build_id, since)

    async def save(
        self, cp: Checkpoint, new_turns: list[Turn], lease: LeaseChange = NO_LEASE_CHANGE
    ) -> bool:
        took = await self.store.save(cp, new_turns, lease=lease)
        if cp.terminal or cp.status == "sleeping":
            self.kept.forget(cp.build_id)  # a sleeping or finished build holds no memory here
        else:
            self.kept.saved(cp, new_turns)
        return took

    async def mark_sent(self, sent: dict[str, int]) -> None:
        await self.store.mark_sent(sent)

    async def take_lease(
        self, build_id: str, token: str, ttl_s: float
    ) -> tuple[float, Checkpoint | None]:
        wait, cp = await self.store.take_lease(build_id, token, ttl_s)
        return wait, None if cp is None else self.clearing.unsent(cp)

    async def extend_lease(self, build_id: str, token: str, ttl_s: float) -> bool:
        return await self.store.extend_lease(build_id, token, ttl_s)

    async def extend_leases(self, leases: dict[str, str], ttl_s: float) -> set[str]:
        return await self.store.extend_leases(leases, ttl_s)

    async def release_lease(self, build_id: str, token: str) -> None:
        await self.store.release_lease(build_id, token)

    async def idle(self, idle_s: float, limit: int) -> list[Idle]:
        return await self.store.idle(idle_s, limit)

    # ------------------------------------------------------------------ what it keeps

    async def recall(self, build_id: str) -> Checkpoint | None:
        """The checkpoint a handler was last done with, handed out once (a handler changes it);
        None if none is kept. One being handed back (``returning``) is waited for."""
        back = self._returning.get(build_id)
        if back is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RETURN_WAIT_S):
                    await back.wait()
        return self.kept.recall(build_id)

    @contextlib.contextmanager
    def returning(self, build_id: str) -> Iterator[None]:
        """Around publishing the outbox of a checkpoint the handler is then ``done`` with (or
        fails to publish): recalls of the build meanwhile wait for the end of it."""
        back = self._returning[build_id] = asyncio.Event()
        try:
            yield
        finally:
            if self._returning.get(build_id) is back:
                del self._returning[build_id]
            back.set()

    def done(self, cp: Checkpoint) -> None:
        """The handler is done with ``cp`` (its outbox published): kept for the build's next
        message, or dropped if the build sleeps or has ended."""
        if cp.terminal or cp.status == "sleeping":
            self.kept.forget(cp.build_id)
        else:
            self.kept.remember(cp)

    def drop(self, build_id: str) -> None:
        """Keep nothing of the build (it moved on in a way this replica did not see)."""
        self.kept.forget(build_id)

    def sent(self, cp: Checkpoint, *, done: bool = False) -> None:
        """The outbox of ``cp`` is published: cleared in the row soon (``clearing.py``), and
        ``done`` at once (a result answering a ToolCall just published often arrives first; a
        save from the kept checkpoint replaces the published outbox, so the clearing may lose)."""
        cp.outbox = []
        if done:
            self.done(cp)
        self.clearing.add(cp.build_id, cp.version)

    async def conversation(self, cp: Checkpoint) -> list[Turn]:
        """The checkpoint's ``cp.turns`` turns: those kept are reused, only newer ones are
        fetched, so a think does not read the whole conversation again."""
        known = self.kept.forget(cp.build_id) or Entry()
        new = []
        if len(known.turns) < cp.turns:
            new = await self.store.turns(cp.build_id, since=len(known.turns))
        self.kept.keep(cp.build_id, known, new)
        turns = known.turns[: cp.turns]
        if any(t.seq != i for i, t in enumerate(turns)) or len(turns) != cp.turns:
            log.warning(
                "turns cache out of step; reading them all", extra={"build_id": cp.build_id}
            )
            self.kept.forget(cp.build_id)
            return await self.store.turns(cp.build_id)
        return turns
