"""One lock per build, held by whatever must not run at once for the same build."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class BuildLocks:
    """One asyncio.Lock per build, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, build_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(build_id, (asyncio.Lock(), 0))
        self._locks[build_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[build_id]
            if users <= 1:
                del self._locks[build_id]
            else:
                self._locks[build_id] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
