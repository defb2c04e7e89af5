"""The driver of the TAOR state machine: each message loads a build's checkpoint, advances it with
a transition (``transitions.py``, plain functions), saves it (optimistic concurrency on its
version) and only then publishes what the step produced. A model call runs under the build's
think lease.

The messages a step produces are stored in the row (its outbox) in the same write; the next
handling of any message of the build republishes an outbox that was never marked sent, with the
same stable event ids, so a crash between commit and publish loses nothing and duplicates nothing.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

from kiln_contracts import (
    BudgetGate,
    BuildRequested,
    CancelRequested,
    SendUserMessage,
    SleepRequested,
    ToolResult,
    WakeRequested,
    stable_id,
)
from kiln_contracts.messages import FailureReason
from kiln_runtime import metrics
from kiln_runtime.config import Cost, KilnConfig
from kiln_runtime.errors import Conflict, PermanentError, RetryLater
from kiln_runtime.retry import retry

from . import control, endings, stalls, tools, transitions
from .caching_store import CachingStore
from .checkpoint import Checkpoint, SleepRequest, Turn
from .config import AgentConfig
from .context import (
    CACHE,
    build_request,
    compaction_point,
    context_tokens,
    summary_point,
    summary_request,
)
from .ports import (
    CheckpointStore,
    ContextWindowExceeded,
    Gates,
    Idle,
    LeaseChange,
    Model,
    ModelError,
    ModelReply,
    ModelRequest,
    Publisher,
    VersionConflict,
)
from .transitions import CONTINUE, Advance, Rules

__all__ = ["CACHE", "CONTINUE", "Agent", "build_request"]

log = logging.getLogger(__name__)

# Tries at saving a paid reply (full-jitter backoff capped at 5 s: about two minutes).
KEEP_ATTEMPTS = 50


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
        self.model = model
        self.publisher = publisher
        self.rules = Rules(config, kiln)
        self.save_attempts = save_attempts
        self.lease_s = lease_s
        self.tools = tools.definitions(config.narrate_description)
        self.budget_gates = budget_gates  # None: no budget (an in-process run)
        # the think leases this replica holds while their model calls run ({build_id: token}),
        # renewed together by one task (one statement for all of them every lease_s / 3)
        self._held: dict[str, str] = {}
        self._renewer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ messages

    async def build_requested(self, msg: BuildRequested, delivered: int = 1) -> None:
        """Start a build; a second request for the same build id changes nothing. Behind its
        user's closed budget gate the build is rejected instead, for good (BuildRejected). A
        fork starts from its source's checkpoint and turns (the source is only read); one whose
        source is unknown (after a few deliveries: it may be on its way), another user's, or not
        at that iteration yet is a dead letter."""
        if await self.store.load(msg.build_id) is None:
            if msg.fork is not None:
                source = await self.store.load(msg.fork.build_id)
                refusal = control.fork_refusal(msg, source)
                if refusal is not None:
                    if source is None and delivered < 5:
                        raise RetryLater(refusal, delay_s=min(30.0, 0.5 * 2**delivered))
                    raise PermanentError(f"cannot fork: {refusal}")
                assert source is not None
                turns = await self.store.turns(source.build_id)
                cp, turns = control.fork(self.rules, msg, source, turns)
            else:
                cp, turns = control.start(self.rules, msg)
            if (gate := await self._gate(cp)) is not None:  # no allowance: it never starts
                turns = control.reject(cp, msg, gate)
            if await self.store.create(cp, turns):
                log.info(
                    "build %s",
                    ("forked" if msg.fork else "started") if turns else "rejected",
                    extra={"build_id": msg.build_id},
                )
        await self._after(msg.build_id, msg.event_id)

    async def tool_result(self, msg: ToolResult) -> None:
        """Record a result of the current iteration; think again once the set is complete (the
        save that completes it takes the think lease as well)."""
        saved = await self._step(
            msg.build_id, lambda cp: transitions.record(cp, msg), take_lease=uuid.uuid4().hex
        )
        await self._after(msg.build_id, msg.event_id, saved)

    async def cancel(self, msg: CancelRequested) -> None:
        await self._step(msg.build_id, lambda cp: control.cancel(cp, msg))

    async def sleep(self, msg: SleepRequested) -> None:
        await self._step(msg.build_id, lambda cp: control.sleep(cp, msg))

    async def wake(self, msg: WakeRequested) -> None:
        await self._step(msg.build_id, lambda cp: control.wake(cp, msg))
        await self._after(msg.build_id, msg.event_id)

    async def user_message(self, msg: SendUserMessage, delivered: int = 1) -> None:
        """Take a user's message (in order, once); a build that has ended continues with it (the
        save that continues it takes the think lease). A message for the call in flight waits
        for its reply; one that must wait for an earlier message, or for its build to be
        created, is deferred, longer at each delivery (``delivered``: this one's number)."""
        saved = await self._step(
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
            placed = await self._step(msg.build_id, control.place, first=saved, take_lease=token)
            if placed is None:
                await self.store.release_lease(msg.build_id, token or "")
            saved = placed
        await self._after(msg.build_id, msg.event_id, saved)

    async def nudge(self, idle: Idle, watch: stalls.Watch) -> None:
        """The watchdog's retry of a build that stopped moving, or its failure (``stalls``); a
        build that moved since the sweep saw it is left alone."""
        cause = stable_id(idle.build_id, "stalled", idle.version)
        saved = await self._step(
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

    # ------------------------------------------------------------------ think

    async def _after(
        self, build_id: str, cause: uuid.UUID, known: Checkpoint | None = None
    ) -> None:
        """Republish a stranded outbox, and think while the build wants a model call.
        ``known``: the checkpoint this handler has just saved (and published)."""
        while await self._think(build_id, cause, known):
            known = None

    async def _think(
        self, build_id: str, cause: uuid.UUID, known: Checkpoint | None = None
    ) -> bool:
        """One model call if the build is thinking; True if it still is afterwards. A replica
        that finds another's fresh lease (a redelivery while that one is mid-call) defers the
        message instead of calling too."""
        cp = known if known is not None else await self.store.load(build_id)
        if cp is None:
            return False
        await self._flush(cp)
        if cp.status != "thinking":
            self.store.done(cp)
            return False
        token = known.lease if known is not None else None
        if token is None:  # else the save that made the build thinking took the lease
            token = uuid.uuid4().hex
            # taken, and the checkpoint read afresh under it, in one go (a twin may have
            # thought before the lease)
            wait, cp = await self.store.take_lease(build_id, token, self.lease_s)
            if wait > 0:
                raise RetryLater(f"build {build_id} is thinking on another replica", delay_s=wait)
            if cp is None:
                return False
        self._held[build_id] = token
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._extend_leases())
        saved: Checkpoint | None = None
        try:
            again, saved = await self._think_leased(cp, cause, token)
        finally:
            if self._held.get(build_id) == token:
                del self._held[build_id]
            if not self._held and self._renewer is not None:
                self._renewer.cancel()  # nothing left to renew
                self._renewer = None
            if saved is None:  # else its save gave the lease up
                await self.store.release_lease(build_id, token)
        if saved is None:
            self.store.drop(build_id)  # moved on during the think (slept, was cancelled)
            return again
        # published after the release, so that a result answering one of these ToolCalls at
        # once never finds the lease still held
        await self._flush(saved, done=not again)
        return again

    async def _think_leased(
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
        if (failure := control.precheck(self.rules, cp)) is None:
            turns = await self.store.conversation(cp)
            fitted = await self._fit(cp, turns)
            if fitted is None:
                return True, None  # moved on while compacting: look again
            request, failure, summary = fitted
            # right before the call (the turn's, or a summarising one): a sleep asked for, or no
            # allowance left (the user's gate)
            calls = request is not None or summary is not None
            if calls and (sleep := cp.state.sleep or await self._gate_sleep(cp)):
                slept = await self._step(
                    cp.build_id,
                    lambda c: control.sleep_before_call(c, sleep, iteration, cause),
                    publish=False,
                    first=cp,
                    give_up=token,
                )
                return False, slept
            if summary is not None:
                return await self._summarise(cp, turns, summary, cause, token)
            if request is not None:
                try:
                    answer = await self.model.complete(request)
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
        saved = await self._keep(cp, advance, token)
        return saved is not None and saved.status == "thinking", saved

    async def _gate(self, cp: Checkpoint) -> BudgetGate | None:
        """The build's user's budget gate if it is closed (RetryLater if it cannot be known)."""
        return None if self.budget_gates is None else await self.budget_gates.closed(cp.user_id)

    async def _gate_sleep(self, cp: Checkpoint) -> SleepRequest | None:
        gate = await self._gate(cp)
        return None if gate is None else control.gate_sleep(gate)

    async def _fit(
        self, cp: Checkpoint, turns: list[Turn]
    ) -> (
        tuple[ModelRequest | None, tuple[FailureReason, str] | None, tuple[int, int] | None] | None
    ):
        """(the request, a failure, a summary to make first): the request compacted first if it
        would pass ``compact_at`` of the window (or the last call overflowed) — old tool output
        and file contents cleared, or, if that is not enough, (the turns to summarise up to, the
        clearing watermark) for a summarising call to make before anything else; a
        context_window failure if it cannot fit; None if the build moved on."""
        request = self._request(cp, turns)
        window = self.rules.window(cp.model)
        size = context_tokens(cp, turns, request)
        if cp.state.compact_now or size > self.rules.config.compact_at * window:
            point = compaction_point(cp, turns, self.rules.config)
            cleared = max(cp.state.compacted_before, point or 0)
            upto = summary_point(cp, turns, request, self.rules.config, window, cleared)
            if upto is None and point is None and cp.state.compact_now:
                # the API counted more than the estimate: nothing to clear, so summarise
                upto = summary_point(
                    cp, turns, request, self.rules.config, window, cleared, force=True
                )
            if upto is not None:
                return None, None, (upto, cleared)
            if point is not None:
                iteration = cp.iteration
                saved = await self._step(
                    cp.build_id, lambda c: control.compact(c, iteration, point)
                )
                if saved is None:
                    return None
                log.info(
                    "compacted: turns before %d cleared (~%d tokens of %d)",
                    point,
                    size,
                    window,
                    extra={"build_id": cp.build_id},
                )
                request = self._request(saved, turns)
                size = context_tokens(saved, turns, request)
            elif cp.state.compact_now:
                return (
                    None,
                    (
                        "context_window",
                        f"the conversation overflowed the {window}-token window of {cp.model} "
                        "and nothing is left to clear or summarise",
                    ),
                    None,
                )
        if size > window:
            return (
                None,
                (
                    "context_window",
                    f"~{size} tokens do not fit the {window}-token window of {cp.model}",
                ),
                None,
            )
        return request, None, None

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
        name = self.rules.kiln.resolve(cp.model)
        spec = self.rules.kiln.models[name] if name else None
        request = summary_request(cp, turns, self.rules.config, spec, upto)
        try:
            answer: ModelReply | ModelError = await self.model.complete(request)
        except ModelError as err:
            answer = err
        priced = self._price(cp, answer) if isinstance(answer, ModelReply) else None

        def advance(c: Checkpoint) -> list[Turn] | None:
            if c.status != "thinking" or (c.iteration, c.turns) != at:
                return None
            if isinstance(answer, ModelError):
                reason: FailureReason = (
                    "context_window" if isinstance(answer, ContextWindowExceeded) else "model_error"
                )
                endings.fail(c, cause, reason, f"the summarising call failed: {answer}")
                return []
            assert priced is not None
            return control.summarised(c, at, upto, cleared, answer, priced, cause)

        saved = await self._keep(cp, advance, token)
        if saved is not None:
            log.info(
                "compacted: turns 1 to %d summarised, before %d cleared",
                upto,
                cleared,
                extra={"build_id": cp.build_id},
            )
        return saved is not None and saved.status == "thinking", saved

    async def _keep(self, cp: Checkpoint, advance: Advance, token: str) -> Checkpoint | None:
        """Save a model call's reply (paid for: a reply lost here is paid again when the build
        thinks again), trying again for about two minutes while the store cannot be reached."""
        return await retry(
            lambda: self._step(cp.build_id, advance, publish=False, first=cp, give_up=token),
            attempts=KEEP_ATTEMPTS,
            retry_on=(Exception,),
            give_up=lambda err: isinstance(err, RetryLater | PermanentError),
            base=0.5,
            cap=5.0,
            on_retry=lambda err, n: log.warning(
                "could not save the reply (attempt %d): %s; trying again",
                n,
                err,
                extra={"build_id": cp.build_id},
            ),
        )

    def _request(self, cp: Checkpoint, turns: list[Turn]) -> ModelRequest:
        name = self.rules.kiln.resolve(cp.model)
        spec = self.rules.kiln.models[name] if name else None
        return build_request(cp, turns, self.tools, self.rules.config, spec)

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

    async def _extend_leases(self) -> None:
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

    # ------------------------------------------------------------------ load, advance, save

    async def _step(
        self,
        build_id: str,
        advance: Advance,
        *,
        publish: bool = True,
        first: Checkpoint | None = None,
        give_up: str | None = None,
        take_lease: str | None = None,
    ) -> Checkpoint | None:
        """Load, advance, save (retrying a lost race on fresh state), then publish (unless the
        caller publishes the returned checkpoint's outbox itself). ``first``: a checkpoint the
        caller has loaded, tried before reading it again; else the one kept from the build's
        last message, if any. A change decided on either is checked by the save's version; "no
        change" is confirmed on a fresh read. ``give_up``: a lease token the save gives up.
        ``take_lease``: a token the save takes the think lease for if the build is then
        thinking (the returned checkpoint's ``lease`` says whether it did)."""
        cp = first if first is not None else self.store.recall(build_id)
        fresh = False
        for _ in range(self.save_attempts):
            if cp is None:
                cp, fresh = await self.store.load(build_id), True
                if cp is None:
                    return None
            await self._flush(cp)
            new_turns = advance(cp)
            if new_turns is None:
                if fresh:
                    return None
                cp = None  # decided on an earlier read: look again
                continue
            take = take_lease if cp.status == "thinking" else None
            try:
                took = await self.store.save(
                    cp, new_turns, LeaseChange(give_up=give_up, take=take, ttl_s=self.lease_s)
                )
            except VersionConflict:
                log.info("version conflict; re-applying", extra={"build_id": build_id})
                cp = None
                continue
            cp.lease = take if took else None
            if publish:
                # a failure here leaves a lease this save took to run out (lease_s): the
                # redelivery of the message then waits for it
                await self._flush(cp)
            return cp
        raise Conflict(f"build {build_id} kept changing under {self.save_attempts} attempts")

    async def _flush(self, cp: Checkpoint, *, done: bool = False) -> None:
        """Publish the outbox, then clear it in the row. ``done``: the handler is done with
        ``cp``, which is kept for the build's next message."""
        if cp.outbox:
            for msg in cp.outbox:
                await self.publisher.publish(msg)
            await self.store.sent(cp, done=done)
        elif done:
            self.store.done(cp)
