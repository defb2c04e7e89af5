"""The think leases this replica holds while their model calls run ({build_id: token}), renewed
together by one task: one statement for all of them every lease_s / 3, and no task when none is
held."""

from __future__ import annotations

import asyncio
import logging

from .ports import CheckpointStore

log = logging.getLogger(__name__)


class Leases:
    def __init__(self, store: CheckpointStore, lease_s: float) -> None:
        self.store = store
        self.lease_s = lease_s
        self._held: dict[str, str] = {}
        self._renewer: asyncio.Task[None] | None = None

    def hold(self, build_id: str, token: str) -> None:
        """Renew the lease of ``token`` until ``let_go``."""
        self._held[build_id] = token
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._extend())

    def let_go(self, build_id: str, token: str) -> None:
        """Renew it no more (the lease itself is given up by a save, or released)."""
        if self._held.get(build_id) == token:
            del self._held[build_id]
        if not self._held and self._renewer is not None:
            self._renewer.cancel()  # nothing left to renew
            self._renewer = None

    async def _extend(self) -> None:
        """Every lease_s / 3 while any model call runs, extend the leases held for them, all in
        one statement (a lease taken since the last round is renewed within lease_s / 3 of
        being taken, as a renewal of its own would be); ends when none is held."""
        try:
            while self._held:
                await asyncio.sleep(self.lease_s / 3)
                held = dict(self._held)
                if not held:
                    break
                try:
                    renewed = await self.store.extend_leases(held, self.lease_s)
                except Exception:
                    log.warning("could not extend the think leases of %d builds", len(held))
                    continue
                for build_id, token in held.items():
                    if build_id not in renewed and self._held.get(build_id) == token:
                        log.warning("think lease lost mid-call", extra={"build_id": build_id})
        finally:
            if self._renewer is asyncio.current_task():
                self._renewer = None
