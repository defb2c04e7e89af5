"""Budget gates, as the agent asks them before each model call and before it starts a build.

The budget service keeps one gate per user in a JetStream key-value bucket
(``kiln_contracts.gates``): closed, until the reset, the moment the user's spend reaches the
allowance; opened again by a top-up. A replica keeps the closed gates in memory, fed by a watch of
the bucket (``kiln_runtime.gates``), so asking costs no request while a gate is open:

* behind a closed gate a think calls no model: the build goes to sleep until the gate's ``until``
  (the reset), exactly as the budget's SleepRequested would put it (the budget sends that too,
  and schedules the WakeRequested that wakes it then); a BuildRequested is rejected
  (``BuildRejected``: the build never starts);
* a gate found closed in memory is read again from the bucket before it is obeyed (the watch may
  lag a reopening: a top-up's WakeRequested is published after its gate opens, and may arrive
  before the watch has it);
* a gate that opens within ``SKEW_S`` is waited for (the message is redelivered then) rather than
  slept behind: a scheduled wake fired by the server's clock must not meet a gate this replica's
  clock still sees closed;
* until the watch has delivered the bucket's current values, and while the bus is disconnected or
  the watch is being restarted, every gate is unknown and the agent fails closed: the message is
  redelivered later (``RetryLater``), no model is called and no build is started.

A reopened gate wakes nothing here: sleeping builds are woken by WakeRequested (the budget's,
scheduled for the reset or sent after a top-up), once each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Protocol

from kiln_contracts import BudgetGate, BuildRejected, BuildRequested, stable_id
from kiln_runtime.errors import RetryLater
from kiln_runtime.gates import GateUpdate
from kiln_runtime.retry import backoff_delay

log = logging.getLogger(__name__)

SKEW_S = 5.0  # a gate opening this soon is waited for, not slept behind (clocks differ)
UNKNOWN_RETRY_S = 5.0  # how soon a message met by unknown gates is redelivered


class GateSource(Protocol):
    """The bucket (real one: ``kiln_runtime.gates.GateBucket``)."""

    def watch(self) -> AsyncIterator[GateUpdate | None]:
        """The bucket's current values, then None (all delivered), then every change."""
        ...

    async def read(self, user_id: str) -> tuple[BudgetGate | None, int]:
        """The user's gate and its revision, read now from the stream's leader."""
        ...

    def connected(self) -> bool: ...

    def stopping(self) -> bool:
        """The bus is draining or closed for good: nothing more to watch."""
        ...


class BudgetGates:
    """The closed gates this replica knows, kept from the bucket's watch."""

    def __init__(
        self,
        source: GateSource,
        *,
        skew_s: float = SKEW_S,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.source = source
        self.skew_s = skew_s
        self.clock = clock
        self._closed: dict[str, BudgetGate] = {}  # user id -> their closed gate
        self._revisions: dict[str, int] = {}  # user id -> the revision of the value kept
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ the watch

    async def start(self, timeout_s: float) -> None:
        """Start watching; return once the bucket's current values are in memory (TimeoutError
        after ``timeout_s``: the agent does not start without them)."""
        self._task = asyncio.create_task(self._run())
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout_s)
        except TimeoutError:
            await self.stop()
            raise TimeoutError(f"the budget gates were not read within {timeout_s:.0f}s") from None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        """Apply the watch's updates; if it fails, forget everything (unknown: closed) and watch
        again from the bucket's current values."""
        attempt = 0
        while True:
            try:
                async for update in self.source.watch():
                    if update is None:
                        self._loaded.set()
                        attempt = 0
                    else:
                        self.apply(*update)
                log.warning("the budget gates' watch ended; watching again")
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if self.source.stopping():
                    return  # the service is shutting down
                log.warning("the budget gates' watch failed (%s); watching again", err)
            self._loaded.clear()
            self._closed.clear()
            self._revisions.clear()
            attempt += 1
            await asyncio.sleep(backoff_delay(attempt, base=0.2, cap=5.0))

    def apply(self, user_id: str, gate: BudgetGate | None, revision: int) -> None:
        """Keep what the bucket says of a user (an older revision than the one kept is ignored:
        a fresh read may have overtaken the watch)."""
        if revision < self._revisions.get(user_id, 0):
            return
        self._revisions[user_id] = revision
        if gate is not None and gate.state == "closed":
            self._closed[user_id] = gate
        else:
            self._closed.pop(user_id, None)

    # ------------------------------------------------------------------ asking

    async def closed(self, user_id: str) -> BudgetGate | None:
        """The user's gate if it is closed now, else None: the model may be called.

        RetryLater when this replica cannot tell, or when the gate opens within ``skew_s``."""
        if not self._loaded.is_set() or not self.source.connected():
            raise RetryLater("the budget gates are not known here yet", delay_s=UNKNOWN_RETRY_S)
        known = self._closed.get(user_id)
        if known is None or not known.closed_at(self.clock()):
            return None
        try:
            gate, revision = await self.source.read(user_id)
        except Exception as err:
            raise RetryLater(f"could not read the budget gate of {user_id}: {err}") from err
        self.apply(user_id, gate, revision)
        now = self.clock()
        if gate is None or not gate.closed_at(now):
            return None
        assert gate.until is not None
        left = (gate.until - now).total_seconds()
        if left <= self.skew_s:
            raise RetryLater(f"the budget gate of {user_id} opens in {left:.1f}s", delay_s=left)
        return gate


def rejection(msg: BuildRequested, gate: BudgetGate) -> BuildRejected:
    """The build's one BuildRejected (a stable id: a republish is the same event)."""
    assert gate.until is not None
    return msg.caused(
        BuildRejected,
        reason=gate.refusal(),
        spent_micro_usd=gate.spent_micro_usd,
        allowance_micro_usd=gate.allowance_micro_usd,
        resets_at=gate.until,
    ).with_id(stable_id(msg.build_id, "rejected"))
