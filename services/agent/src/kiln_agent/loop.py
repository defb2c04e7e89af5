"""The agent: each message of a build is one step of its TAOR state machine, taken by the driver
(``driver.py``: load, advance with a transition, save, publish), then, while the build wants a
model call, the think step (``think.py``: the call under the build's think lease). The
transitions are plain functions (``transitions.py``, ``control.py``, ``compaction.py``)."""

from __future__ import annotations

import logging
import uuid

from kiln_contracts import (
    BuildRequested,
    CancelRequested,
    SendUserMessage,
    SleepRequested,
    ToolResult,
    WakeRequested,
    stable_id,
)
from kiln_runtime import metrics
from kiln_runtime.config import KilnConfig
from kiln_runtime.errors import PermanentError, RetryLater

from . import control, forks, stalls, tools, transitions
from .caching_store import CachingStore
from .checkpoint import Checkpoint
from .config import AgentConfig
from .context import CACHE, build_request
from .driver import Driver
from .ports import CheckpointStore, Gates, Idle, Model, Publisher
from .think import Thinker
from .transitions import CONTINUE, Rules

__all__ = ["CACHE", "CONTINUE", "Agent", "build_request"]

log = logging.getLogger(__name__)


class Agent:
    def __init__(
        self,
        store: CheckpointStore,
        model: Model,
        publisher: Publisher,
        config: AgentConfig,
        kiln: KilnConfig,
        *,
        save_attempts: int = 5,
        lease_s: float = 30.0,
        turn_cache_mb: float = 64.0,
        turn_cache_builds: int = 1_000,
        budget_gates: Gates | None = None,
    ) -> None:
        self.store = CachingStore(
            store, max_chars=int(turn_cache_mb * 2**20), max_builds=turn_cache_builds
        )
        self.driver = Driver(self.store, publisher, save_attempts=save_attempts, lease_s=lease_s)
        self.thinker = Thinker(
            self.store,
            self.driver,
            model,
            Rules(config, kiln),
            tools.definitions(config.narrate_description),
            budget_gates,
        )

    # the model and the rules are the think step's; set here, they are its from the next think
    @property
    def model(self) -> Model:
        return self.thinker.model

    @model.setter
    def model(self, model: Model) -> None:
        self.thinker.model = model

    @property
    def rules(self) -> Rules:
        return self.thinker.rules

    @rules.setter
    def rules(self, rules: Rules) -> None:
        self.thinker.rules = rules

    # ------------------------------------------------------------------ messages

    async def build_requested(self, msg: BuildRequested, delivered: int = 1) -> None:
        """Start a build; a second request for the same build id changes nothing. Behind its
        user's closed budget gate the build is rejected instead, for good (BuildRejected). A
        fork starts from its source's checkpoint and turns (the source is only read); one whose
        source is unknown (after a few deliveries: it may be on its way), another user's, or not
        at that iteration yet is a dead letter."""
        created = await self._create(msg, delivered)
        await self._after(msg.build_id, msg.event_id, created)

    async def _create(self, msg: BuildRequested, delivered: int) -> Checkpoint | None:
        """The build's checkpoint, created now; None if the build exists (the insert finds its
        row: a new build costs no read before it)."""
        if msg.fork is not None:
            if await self.store.load(msg.build_id) is not None:
                return None
            source = await self.store.load(msg.fork.build_id)
            refusal = forks.refusal(msg, source)
            if refusal is not None:
                if source is None and delivered < 5:
                    raise RetryLater(refusal, delay_s=min(30.0, 0.5 * 2**delivered))
                raise PermanentError(f"cannot fork: {refusal}")
            assert source is not None
            turns = await self.store.turns(source.build_id)
            cp, turns = forks.fork(self.rules, msg, source, turns)
        else:
            cp, turns = control.start(self.rules, msg)
        if (gate := await self.thinker.gate(cp)) is not None:  # no allowance: it never starts
            turns = control.reject(cp, msg, gate)
        if not await self.store.create(cp, turns):
            return None
        log.info(
            "build %s",
            ("forked" if msg.fork else "started") if turns else "rejected",
            extra={"build_id": msg.build_id},
        )
        return cp

    async def tool_result(self, msg: ToolResult) -> None:
        """Record a result of the current iteration; think again once the set is complete (the
        save that completes it takes the think lease as well)."""
        saved = await self.driver.step(
            msg.build_id, lambda cp: transitions.record(cp, msg), take_lease=uuid.uuid4().hex
        )
        await self._after(msg.build_id, msg.event_id, saved)

    async def cancel(self, msg: CancelRequested) -> None:
        await self.driver.step(msg.build_id, lambda cp: control.cancel(cp, msg))

    async def sleep(self, msg: SleepRequested) -> None:
        await self.driver.step(msg.build_id, lambda cp: control.sleep(cp, msg))

    async def wake(self, msg: WakeRequested) -> None:
        await self.driver.step(msg.build_id, lambda cp: control.wake(cp, msg))
        await self._after(msg.build_id, msg.event_id)

    async def user_message(self, msg: SendUserMessage, delivered: int = 1) -> None:
        """Take a user's message (in order, once); a build that has ended continues with it (the
        save that continues it takes the think lease). A message for the call in flight waits
        for its reply; one that must wait for an earlier message, or for its build to be
        created, is deferred, longer at each delivery (``delivered``: this one's number)."""
        saved = await self.driver.step(
            msg.build_id,
            lambda cp: control.message(self.rules, cp, msg),
            take_lease=uuid.uuid4().hex,
        )
        if saved is None:
            cp = await self.store.load(msg.build_id)
            delay = min(30.0, 0.25 * 2 ** (delivered - 1))
            if cp is None:
                raise RetryLater(f"build {msg.build_id} does not exist (yet)", delay_s=delay)
            if msg.seq > cp.state.messages + 1:
                wanted = cp.state.messages + 1
                raise RetryLater(f"message {msg.seq} waits for message {wanted}", delay_s=delay)
        elif saved.status == "thinking" and saved.lease is None:
            return  # the holder of the lease places it after the reply of its call
        elif saved.status == "thinking" and saved.state.inbox:
            # this save took the lease, so no call is in flight: the message joins now
            token = saved.lease
            placed = await self.driver.step(
                msg.build_id, control.place, first=saved, take_lease=token
            )
            if placed is None:
                await self.store.release_lease(msg.build_id, token or "")
            saved = placed
        await self._after(msg.build_id, msg.event_id, saved)

    async def nudge(self, idle: Idle, watch: stalls.Watch) -> None:
        """The watchdog's retry of a build that stopped moving, or its failure (``stalls``); a
        build that moved since the sweep saw it is left alone."""
        cause = stable_id(idle.build_id, "stalled", idle.version)
        saved = await self.driver.step(
            idle.build_id,
            lambda cp: stalls.nudge(cp, idle, watch, cause),
            take_lease=uuid.uuid4().hex,
        )
        if saved is not None:
            log.warning(
                "no progress for %.0f s: %s",
                idle.idle_s,
                "failed" if saved.terminal else f"retry {stalls.retries(saved)}",
                extra={"build_id": idle.build_id},
            )
            metrics.STALLED_BUILDS.labels("failed" if saved.terminal else "retried").inc()
            await self._after(idle.build_id, cause, saved)

    async def _after(
        self, build_id: str, cause: uuid.UUID, known: Checkpoint | None = None
    ) -> None:
        """Republish a stranded outbox, and think while the build wants a model call.
        ``known``: the checkpoint this handler has just saved or created (its outbox is
        published first if it is not yet)."""
        while await self.thinker.think(build_id, cause, known):
            known = None
