"""The think step: a model call under the build's think lease (taken, renewed while the call runs,
given up by the save of the reply), with what gates it first (a model change, the limits,
compaction, a sleep asked for or the user's budget gate), and the save of the paid reply."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from kiln_contracts import BudgetGate
from kiln_runtime import metrics
from kiln_runtime.config import Cost
from kiln_runtime.errors import RetryLater

from . import compaction, control, endings, transitions
from .caching_store import CachingStore
from .checkpoint import Checkpoint, SleepRequest, Turn
from .compaction import Fit
from .driver import Driver
from .leases import Leases
from .ports import ContextWindowExceeded, Gates, Model, ModelError, ModelReply
from .transitions import Rules

log = logging.getLogger(__name__)


class Thinker:
    def __init__(
        self,
        store: CachingStore,
        driver: Driver,
        model: Model,
        rules: Rules,
        tools: list[dict[str, Any]],
        budget_gates: Gates | None,
    ) -> None:
        self.store = store
        self.driver = driver
        self.model = model
        self.rules = rules
        self.tools = tools
        self.budget_gates = budget_gates  # None: no budget (an in-process run)
        self.leases = Leases(store, driver.lease_s)

    async def think(self, build_id: str, cause: uuid.UUID, known: Checkpoint | None = None) -> bool:
        """One model call if the build is thinking; True if it still is afterwards. A replica
        that finds another's fresh lease (a redelivery while that one is mid-call) defers the
        message instead of calling too. ``known``: the checkpoint the handler has just saved or
        created (its outbox published here if it is not yet)."""
        cp = known if known is not None else await self.store.load(build_id)
        if cp is None:
            return False
        await self.driver.flush(cp)
        if cp.status != "thinking":
            self.store.done(cp)
            return False
        token = known.lease if known is not None else None
        if token is None:  # else the save that made the build thinking took the lease
            token = uuid.uuid4().hex
            # taken, and the checkpoint read afresh under it, in one go (a twin may have
            # thought before the lease)
            wait, cp = await self.store.take_lease(build_id, token, self.driver.lease_s)
            if wait > 0:
                raise RetryLater(f"build {build_id} is thinking on another replica", delay_s=wait)
            if cp is None:
                return False
        self.leases.hold(build_id, token)
        saved: Checkpoint | None = None
        try:
            again, saved = await self._leased(cp, cause, token)
        finally:
            self.leases.let_go(build_id, token)
            if saved is None:  # else its save gave the lease up
                await self.store.release_lease(build_id, token)
        if saved is None:
            self.store.drop(build_id)  # moved on during the think (slept, was cancelled)
            return again
        # published after the release, so that a result answering one of these ToolCalls at
        # once never finds the lease still held
        await self.driver.flush(saved, done=not again)
        return again

    async def gate(self, cp: Checkpoint) -> BudgetGate | None:
        """The build's user's budget gate if it is closed (RetryLater if it cannot be known)."""
        return None if self.budget_gates is None else await self.budget_gates.closed(cp.user_id)

    async def _leased(
        self, cp: Checkpoint, cause: uuid.UUID, token: str
    ) -> tuple[bool, Checkpoint | None]:
        """(think again?, the saved checkpoint whose outbox is still to be published; its save
        gave the lease of ``token`` up)."""
        if cp.status != "thinking":
            return False, None
        iteration, seen = cp.iteration, cp.turns
        answer: ModelReply | ModelError | None = None
        priced: tuple[datetime, Cost] | None = None
        switch = control.model_switch(self.rules, cp)
        if switch is not None:
            log.info("the tier's model changed: moving the build", extra={"build_id": cp.build_id})
            switch(cp)
        failure = control.precheck(self.rules, cp)
        if failure is None:
            turns = await self.store.conversation(cp)
            fitted = await self._fit(cp, turns)
            if fitted is None:
                return True, None  # moved on while compacting: look again
            failure = fitted.failure
            # right before the call (the turn's, or a summarising one): a sleep asked for, or no
            # allowance left (the user's gate)
            calls = fitted.request is not None or fitted.summary is not None
            if calls and (sleep := cp.state.sleep or await self._gate_sleep(cp)):
                slept = await self.driver.step(
                    cp.build_id,
                    lambda c: control.sleep_before_call(c, sleep, iteration, cause),
                    publish=False,
                    first=cp,
                    give_up=token,
                )
                return False, slept
            if fitted.summary is not None:
                return await self._summarise(cp, turns, fitted.summary, cause, token)
            if fitted.request is not None:
                try:
                    answer = await self.model.complete(fitted.request)
                    priced = self._price(cp, answer)
                except ModelError as err:
                    answer = err

        def advance(c: Checkpoint) -> list[Turn] | None:
            if c.status != "thinking" or c.iteration != iteration or c.turns != seen:
                # moved on meanwhile (cancel, sleep, a twin think, messages placed at a wake):
                # drop the reply
                return None
            if switch is not None:
                switch(c)
            if failure is not None:
                endings.fail(c, cause, *failure)
                return []
            if isinstance(answer, ContextWindowExceeded):
                c.state.compact_now = True  # compact, then ask again
                return []
            if isinstance(answer, ModelError):
                endings.fail(c, cause, "model_error", str(answer))
                return []
            assert answer is not None and priced is not None
            return transitions.reply(self.rules, c, answer, priced, cause)

        # saved on the checkpoint read under the lease: no read again unless it changed
        # meanwhile (the save's version check)
        saved = await self.driver.keep(cp, advance, token)
        return saved is not None and saved.status == "thinking", saved

    async def _gate_sleep(self, cp: Checkpoint) -> SleepRequest | None:
        gate = await self.gate(cp)
        return None if gate is None else control.gate_sleep(gate)

    async def _fit(self, cp: Checkpoint, turns: list[Turn]) -> Fit | None:
        """What the think does (``compaction.fit``), once the turns it clears, if any, are
        cleared; None if the build moved on meanwhile."""
        fitted = compaction.fit(self.rules, self.tools, cp, turns)
        if fitted.clear is None:
            return fitted
        iteration, point = cp.iteration, fitted.clear
        saved = await self.driver.step(
            cp.build_id, lambda c: compaction.compact(c, iteration, point)
        )
        if saved is None:
            return None
        log.info(
            "compacted: turns before %d cleared (~%d tokens of %d)",
            point,
            fitted.size,
            fitted.window,
            extra={"build_id": cp.build_id},
        )
        return compaction.refit(self.rules, self.tools, saved, turns)

    async def _summarise(
        self,
        cp: Checkpoint,
        turns: list[Turn],
        summary: tuple[int, int],
        cause: uuid.UUID,
        token: str,
    ) -> tuple[bool, Checkpoint | None]:
        """The summarising call, under the think lease, and the save of its reply with its charge
        (an IterationCompleted in the outbox, published after the lease is released); the build
        then thinks again, from the gates and limits on."""
        upto, cleared = summary
        at = (cp.iteration, cp.turns)
        request = compaction.summary_call(self.rules, cp, turns, upto)
        try:
            answer: ModelReply | ModelError = await self.model.complete(request)
        except ModelError as err:
            answer = err
        priced = self._price(cp, answer) if isinstance(answer, ModelReply) else None
        saved = await self.driver.keep(
            cp,
            lambda c: compaction.summarised(c, at, upto, cleared, answer, priced, cause),
            token,
        )
        if saved is not None:
            log.info(
                "compacted: turns 1 to %d summarised, before %d cleared",
                upto,
                cleared,
                extra={"build_id": cp.build_id},
            )
        return saved is not None and saved.status == "thinking", saved

    def _price(self, cp: Checkpoint, answer: ModelReply) -> tuple[datetime, Cost]:
        """When the reply came and what it cost at the price then in force (an unknown model at
        the fallback's: counted and logged)."""
        at = datetime.now(UTC)
        cost = self.rules.kiln.cost(answer.model, answer.usage, at)
        if cost.fallback:
            metrics.UNPRICED_ITERATIONS.labels("agent", answer.model).inc()
            log.error(
                "no price for model %r: counted at %s's prices",
                answer.model,
                cost.priced_as,
                extra={"build_id": cp.build_id},
            )
        return at, cost
