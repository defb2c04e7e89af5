"""An in-memory CheckpointStore with the same semantics as the Postgres one (tests, demos)."""

from __future__ import annotations

import copy
import time

from ..checkpoint import Checkpoint, Turn
from ..ports import NO_LEASE_CHANGE, Idle, LeaseChange, VersionConflict


class MemoryStore:
    def __init__(self) -> None:
        self.rows: dict[str, Checkpoint] = {}
        self.conversation: dict[str, list[Turn]] = {}
        self.saves = 0
        self.leases: dict[str, tuple[str, float]] = {}
        self.updated: dict[str, float] = {}  # build id: when its row last changed (monotonic)

    async def create(self, cp: Checkpoint, turns: list[Turn]) -> bool:
        if cp.build_id in self.rows:
            return False
        cp.version = 1
        self.rows[cp.build_id] = self._row(cp)
        self.conversation[cp.build_id] = list(turns)
        self.updated[cp.build_id] = time.monotonic()
        return True

    async def load(self, build_id: str) -> Checkpoint | None:
        row = self.rows.get(build_id)
        return copy.deepcopy(row) if row else None

    async def turns(self, build_id: str, since: int = 0) -> list[Turn]:
        return [t for t in self.conversation.get(build_id, []) if t.seq >= since]

    async def save(
        self,
        cp: Checkpoint,
        new_turns: list[Turn],
        lease: LeaseChange = NO_LEASE_CHANGE,
    ) -> bool:
        row = self.rows.get(cp.build_id)
        if row is None or row.version != cp.version:
            raise VersionConflict(cp.build_id)
        cp.version += 1
        self.rows[cp.build_id] = self._row(cp)
        self.conversation[cp.build_id].extend(copy.deepcopy(new_turns))
        self.updated[cp.build_id] = time.monotonic()
        self.saves += 1
        if lease.give_up is not None:
            await self.release_lease(cp.build_id, lease.give_up)
        return lease.take is not None and self._lease(cp.build_id, lease.take, lease.ttl_s) == 0.0

    @staticmethod
    def _row(cp: Checkpoint) -> Checkpoint:
        row = copy.deepcopy(cp)
        row.lease = None  # a holder's, in its memory: not part of the row
        return row

    def _lease(self, build_id: str, token: str, ttl_s: float) -> float:
        """Take the lease for ``token`` if it is free, ran out or is its own: 0.0; else the
        seconds left on the other holder's."""
        now = time.monotonic()
        holder, until = self.leases.get(build_id, ("", 0.0))
        if holder not in ("", token) and until > now:
            return until - now
        self.leases[build_id] = (token, now + ttl_s)
        return 0.0

    async def mark_sent(self, sent: dict[str, int]) -> None:
        for build_id, version in sent.items():
            row = self.rows.get(build_id)
            if row is not None and row.version == version:
                row.outbox = []

    async def take_lease(
        self, build_id: str, token: str, ttl_s: float
    ) -> tuple[float, Checkpoint | None]:
        if build_id not in self.rows:
            return 0.0, None
        wait = self._lease(build_id, token, ttl_s)
        return (wait, None) if wait > 0 else (0.0, await self.load(build_id))

    async def extend_lease(self, build_id: str, token: str, ttl_s: float) -> bool:
        if self.leases.get(build_id, ("", 0.0))[0] != token:
            return False
        self.leases[build_id] = (token, time.monotonic() + ttl_s)
        return True

    async def extend_leases(self, leases: dict[str, str], ttl_s: float) -> set[str]:
        renewed = {b for b, token in leases.items() if self.leases.get(b, ("", 0.0))[0] == token}
        for b in renewed:
            self.leases[b] = (leases[b], time.monotonic() + ttl_s)
        return renewed

    async def release_lease(self, build_id: str, token: str) -> None:
        if self.leases.get(build_id, ("", 0.0))[0] == token:
            del self.leases[build_id]

    async def idle(self, idle_s: float, limit: int) -> list[Idle]:
        now = time.monotonic()
        found = [
            Idle(b, row.version, now - self.updated[b])
            for b, row in self.rows.items()
            if row.status in ("thinking", "acting")
            and now - self.updated[b] >= idle_s
            and self.leases.get(b, ("", 0.0))[1] <= now
        ]
        return sorted(found, key=lambda i: -i.idle_s)[:limit]
