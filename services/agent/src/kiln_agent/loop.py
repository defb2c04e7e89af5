"""The TAOR loop as a state machine: each message loads a build's checkpoint, advances it, saves it
(optimistic concurrency on its version) and only then publishes what the step produced.

The messages a step produces are stored in the row (its outbox) in the same transaction; the next
handling of any message of the build republishes an outbox that was never marked sent, with the
same stable event ids, so a crash between commit and publish loses nothing and duplicates nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from kiln_contracts import (
    AgentNarrated,
    BudgetGate,
    BuildCancelled,
    BuildCompleted,
    BuildFailed,
    BuildRequested,
    BuildResumed,
    BuildSleeping,
    CancelRequested,
    CheckpointSaved,
    Envelope,
    IterationCompleted,
    SleepRequested,
    ToolCall,
    ToolResult,
    WakeRequested,
    stable_id,
)
from kiln_contracts.messages import FailureReason
from kiln_runtime.config import KilnConfig
from kiln_runtime.errors import Conflict, RetryLater

from . import gates, tools
from .checkpoint import Checkpoint, Outcome, PendingCall, SleepRequest, Turn
from .config import AgentConfig
from .context import CACHE, build_request, compaction_point, context_tokens
from .kept import Entry, Kept
from .ports import (
    CheckpointStore,
    ContextWindowExceeded,
    Gates,
    Model,
    ModelError,
    ModelReply,
    ModelRequest,
    Publisher,
    VersionConflict,
)

__all__ = ["CACHE", "CONTINUE", "Agent", "build_request"]

log = logging.getLogger(__name__)

CONTINUE = "Your reply was cut off by the token limit. Continue where you stopped."

Advance = Callable[[Checkpoint], list[Turn] | None]
"""A step: mutate the checkpoint and return the new turns ([] for none), or None for no change."""


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
        self.store = store
        self.model = model
        self.publisher = publisher
        self.config = config
        self.kiln = kiln
        self.save_attempts = save_attempts
        self.lease_s = lease_s
        self.tools = tools.definitions(config.narrate_description)
        self.kept = Kept(int(turn_cache_mb * 2**20), turn_cache_builds)
        self.budget_gates = budget_gates  # None: no budget (an in-process run)

    # ------------------------------------------------------------------ messages

    async def build_requested(self, msg: BuildRequested) -> None:
        """Start a build; a second request for the same build id changes nothing. Behind its
        user's closed budget gate the build is rejected instead, for good (BuildRejected)."""
        if await self.store.load(msg.build_id) is None:
            extra = {"build_id": msg.build_id}
            cp = self._new_checkpoint(msg)
            first = Turn(
                0, "user", [{"type": "text", "text": self.config.first_turn(msg.build_id)}]
            )
            cp.turns, turns = 1, [first]
            if (gate := await self._gate(cp)) is not None:  # no allowance: it never starts
                cp.status, cp.turns, turns = "rejected", 0, []
                cp.outbox.append(gates.rejection(msg, gate))
            if await self.store.create(cp, turns):
                log.info("build %s", "started" if turns else "rejected", extra=extra)
        await self._after(msg.build_id, msg.event_id)

    async def tool_result(self, msg: ToolResult) -> None:
        """Record a result of the current iteration; think again once the set is complete (the
        save that completes it takes the think lease as well)."""
        saved = await self._step(
            msg.build_id, lambda cp: self._record(cp, msg), lease=uuid.uuid4().hex
        )
        await self._after(msg.build_id, msg.event_id, saved)

    async def cancel(self, msg: CancelRequested) -> None:
        def advance(cp: Checkpoint) -> list[Turn] | None:
            if cp.terminal:
                return None
            cp.status = "cancelled"
            cp.state.pending, cp.state.results = [], {}
            cp.outbox.append(
                _caused(
                    msg,
                    BuildCancelled,
                    stable_id(cp.build_id, "cancelled"),
                    reason=msg.reason,
                    iterations=cp.iteration,
                    cost_micro_usd=cp.cost_micro_usd,
                )
            )
            return []

        await self._step(msg.build_id, advance)

    async def sleep(self, msg: SleepRequested) -> None:
        """Sleep before the build's next model call: a call in flight is answered and its reply
        kept (it is paid for, and charged), and the build sleeps at its next think, or as soon as
        the iteration's set completes."""

        def advance(cp: Checkpoint) -> list[Turn] | None:
            if cp.terminal or cp.status == "sleeping" or cp.state.sleep is not None:
                return None
            cp.state.sleep = SleepRequest(reason=msg.reason, wake_at=msg.wake_at)
            return []

        await self._step(msg.build_id, advance)

    async def wake(self, msg: WakeRequested) -> None:
        def advance(cp: Checkpoint) -> list[Turn] | None:
            if cp.status == "sleeping":
                cp.status = "thinking"
                cp.outbox.append(
                    _caused(
                        msg,
                        BuildResumed,
                        stable_id(cp.build_id, "resumed", cp.state.sleeps),
                        reason=msg.reason,
                    )
                )
                return []
            if cp.state.sleep is not None and not cp.terminal:
                cp.state.sleep = None  # woken before the pending sleep took effect
                return []
            return None

        await self._step(msg.build_id, advance)
        await self._after(msg.build_id, msg.event_id)

    # ------------------------------------------------------------------ the loop

    async def _after(
        self, build_id: str, cause: uuid.UUID, known: Checkpoint | None = None
    ) -> None:
        """Republish a stranded outbox, and think while the build wants a model call.

        ``known``: the checkpoint this handler has just saved (and published), so the first
        look need not read it again."""
        while await self._think(build_id, cause, known):
            known = None

    async def _think(
        self, build_id: str, cause: uuid.UUID, known: Checkpoint | None = None
    ) -> bool:
        """One model call if the build is thinking; True if it still is afterwards.

        The call runs under the build's lease: a replica that finds another's fresh lease (a
        redelivery while that replica is mid-call) defers the message instead of calling too."""
        cp = known if known is not None else await self.store.load(build_id)
        if cp is None:
            return False
        await self._flush(cp)
        if cp.status != "thinking":
            if cp.terminal:
                self.kept.forget(build_id)
            else:
                self.kept.remember(cp)
            return False
        token = known.lease if known is not None else None
        if token is None:
            token = uuid.uuid4().hex
            # the lease taken and the checkpoint read afresh under it, in one statement (a twin
            # may have thought before the lease)
            wait, cp = await self.store.take(build_id, token, self.lease_s)
            if wait > 0:
                raise RetryLater(f"build {build_id} is thinking on another replica", delay_s=wait)
            if cp is None:
                return False
        # else the save that made the build thinking took the lease: cp is the latest state
        renew = asyncio.create_task(self._renew(build_id, token))
        saved: Checkpoint | None = None
        try:
            again, saved = await self._think_leased(cp, cause, token)
        finally:
            renew.cancel()
            if saved is None:  # else the save gave the lease up
                await self.store.release(build_id, token)
        if saved is None:
            # the build moved on during the think (slept, was cancelled): the turns this think
            # read into the cache are not kept (a save that ends or sleeps it forgets them too)
            self.kept.forget(build_id)
            return again
        # published after the release, so that a result answering one of these ToolCalls at
        # once never finds the lease still held (and waits for it to run out)
        await self._flush(saved, keep=not again)
        return again

    async def _think_leased(
        self, cp: Checkpoint, cause: uuid.UUID, token: str
    ) -> tuple[bool, Checkpoint | None]:
        """(think again?, the saved checkpoint whose outbox is still to be published; its save
        gave the lease of ``token`` up)."""
        build_id = cp.build_id
        if cp.status != "thinking":
            return False, None
        iteration = cp.iteration
        reply: ModelReply | ModelError | None = None
        if (failure := self._precheck(cp)) is None:
            turns = await self._turns(cp)
            fitted = await self._fit(cp, turns)
            if fitted is None:
                return True, None  # moved on while compacting: look again
            request, failure = fitted
            # right before the call: a sleep asked for, or no allowance left (the user's gate)
            if (
                request is not None
                and (sleep := cp.state.sleep or await self._gate_sleep(cp)) is not None
            ):
                slept = await self._step(
                    build_id,
                    lambda c: self._sleep_before_call(c, sleep, iteration, cause),
                    publish=False,
                    first=cp,
                    release=token,
                )
                return False, slept
            if request is not None:
                try:
                    reply = await self.model.complete(request)
                except ModelError as err:
                    reply = err

        def advance(c: Checkpoint) -> list[Turn] | None:
            if c.status != "thinking" or c.iteration != iteration:
                return None  # moved on meanwhile (cancel, sleep, a twin think): drop the reply
            if failure is not None:
                self._fail(c, cause, *failure)
                return []
            if isinstance(reply, ContextWindowExceeded):
                c.state.compact_now = True  # compact, then ask again
                return []
            if isinstance(reply, ModelError):
                self._fail(c, cause, "model_error", str(reply))
                return []
            assert reply is not None
            return self._apply(c, reply, cause)

        # the reply is saved on the checkpoint read under the lease: no read again unless it
        # changed meanwhile (the save's version check)
        saved = await self._step(build_id, advance, publish=False, first=cp, release=token)
        return saved is not None and saved.status == "thinking", saved

    async def _turns(self, cp: Checkpoint) -> list[Turn]:
        """The checkpoint's ``cp.turns`` turns: those this replica read or saved before are
        reused, only newer ones are fetched, so a think does not read the whole conversation
        again."""
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

    async def _fit(
        self, cp: Checkpoint, turns: list[Turn]
    ) -> tuple[ModelRequest | None, tuple[FailureReason, str] | None] | None:
        """The request, compacted first if it would pass ``compact_at`` of the window (or the last
        call overflowed); a context_window failure if it cannot fit; None if the build moved on."""
        request = self._request(cp, turns)
        window = self.config.window(cp.model)
        size = context_tokens(cp, turns, request)
        if cp.state.compact_now or size > self.config.compact_at * window:
            point = compaction_point(cp, turns, self.config)
            if point is not None:
                iteration = cp.iteration

                def compact(c: Checkpoint) -> list[Turn] | None:
                    if c.status != "thinking" or c.iteration != iteration:
                        return None
                    c.state.compacted_before = max(c.state.compacted_before, point)
                    c.state.context_tokens, c.state.compact_now = None, False
                    return []

                saved = await self._step(cp.build_id, compact)
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
                return None, (
                    "context_window",
                    f"the conversation overflowed the {window}-token window of {cp.model} "
                    "and no old tool output is left to clear",
                )
        if size > window:
            return None, (
                "context_window",
                f"~{size} tokens do not fit the {window}-token window of {cp.model}",
            )
        return request, None

    async def _renew(self, build_id: str, token: str) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                if not await self.store.renew(build_id, token, self.lease_s):
                    log.warning("think lease lost mid-call", extra={"build_id": build_id})
            except Exception:
                log.warning("could not renew the think lease", extra={"build_id": build_id})

    async def _gate(self, cp: Checkpoint) -> BudgetGate | None:
        """The build's user's budget gate if it is closed (RetryLater if it cannot be known)."""
        return None if self.budget_gates is None else await self.budget_gates.closed(cp.user_id)

    async def _gate_sleep(self, cp: Checkpoint) -> SleepRequest | None:
        """Behind a closed gate: asleep until it opens, as the budget's SleepRequested would say."""
        gate = await self._gate(cp)
        return None if gate is None else SleepRequest(reason=gate.sleep_reason, wake_at=gate.until)

    def _sleep_before_call(
        self, cp: Checkpoint, sleep: SleepRequest, iteration: int, cause: uuid.UUID
    ) -> list[Turn] | None:
        if cp.status != "thinking" or cp.iteration != iteration:
            return None
        cp.state.sleep = cp.state.sleep or sleep
        self._go_to_sleep(cp, cause)
        return []

    def _precheck(self, cp: Checkpoint) -> tuple[FailureReason, str] | None:
        if not cp.model:
            return "internal", f"unknown tier {cp.tier!r}"
        if cp.iteration >= cp.limits.max_iterations:
            return "iteration_limit", f"reached {cp.limits.max_iterations} iterations"
        cap = self._cap(cp)
        if cap is not None and cp.cost_micro_usd >= cap:
            return "cost_limit", f"spent {cp.cost_micro_usd} of {cap} micro-USD"
        return None

    def _apply(self, cp: Checkpoint, reply: ModelReply, cause: uuid.UUID) -> list[Turn]:
        """Advance by one model reply: the assistant turn, then act on its stop reason."""
        cp.iteration += 1
        n = cp.iteration
        price = self.kiln.prices.get(reply.model) or self.kiln.prices.get(cp.model)
        cost = price.cost_micro_usd(reply.usage) if price else 0
        cp.cost_micro_usd += cost
        cp.outbox.append(
            IterationCompleted(
                event_id=stable_id(cp.build_id, "iteration", n),
                build_id=cp.build_id,
                user_id=cp.user_id,
                causation_id=cause,
                iteration=n,
                model=reply.model,
                usage=reply.usage,
                stop_reason=reply.stop_reason,
                cost_micro_usd=cost,
            )
        )
        cap = self._cap(cp)
        if cap is not None and cp.cost_micro_usd > cap:
            self._fail(cp, cause, "cost_limit", f"spent {cp.cost_micro_usd} of {cap} micro-USD")
            return []
        if reply.stop_reason == "model_context_window_exceeded":
            cp.state.compact_now = True  # the partial reply is dropped; compact, then ask again
            return []
        content = _clean(reply.content)
        calls = [b for b in content if b["type"] == "tool_use"]
        if reply.stop_reason in ("max_tokens", "pause_turn"):
            content = [b for b in content if b["type"] != "tool_use"] or [
                {"type": "text", "text": "(cut off)"}
            ]
        turns = [self._turn(cp, "assistant", content)]
        u = reply.usage
        cp.state.context_tokens = (
            u.input_tokens
            + u.cache_read_input_tokens
            + u.cache_creation_input_tokens
            + u.output_tokens
        )
        cp.state.context_turns = cp.turns
        if reply.stop_reason == "tool_use" and calls:
            turns += self._act(cp, calls, cause)
        elif reply.stop_reason in ("end_turn", "stop_sequence"):
            self._finish(cp, _text(content), cause)
        elif reply.stop_reason == "max_tokens":
            turns.append(self._turn(cp, "user", [{"type": "text", "text": CONTINUE}]))
        elif reply.stop_reason == "pause_turn":
            pass  # the request ends with this assistant turn: the model carries on from it
        elif reply.stop_reason == "refusal":
            self._fail(cp, cause, "model_refusal", _text(content)[:2000])
        else:
            self._fail(cp, cause, "model_error", f"unexpected stop_reason {reply.stop_reason!r}")
        return turns

    def _act(self, cp: Checkpoint, calls: list[dict[str, Any]], cause: uuid.UUID) -> list[Turn]:
        """One ToolCall per valid tool_use block. Narrate, unknown tools and input that fails the
        tool's schema are answered here (the last two as errors), without the sandbox."""
        cp.state.pending, cp.state.results = [], {}
        for block in calls:
            call = PendingCall(call_id=block["id"], tool=block["name"], input=block["input"])
            cp.state.pending.append(call)
            signature = f"{call.tool}:{json.dumps(call.input, sort_keys=True)}"
            if signature == cp.state.streak_call:
                cp.state.streak += 1
            else:
                cp.state.streak_call, cp.state.streak = signature, 1
            if cp.state.streak >= self.config.repetition_limit:
                self._fail(
                    cp, cause, "repetition", f"{cp.state.streak} identical calls: {signature[:500]}"
                )
                return []
            if call.tool not in tools.SANDBOX_TOOLS and call.tool != tools.NARRATE:
                cp.state.results[call.call_id] = Outcome(
                    content=f"unknown tool {call.tool!r}", is_error=True
                )
            elif (problem := tools.input_error(call.tool, call.input)) is not None:
                # answered here: a call the sandbox would refuse never reaches it
                cp.state.results[call.call_id] = Outcome(content=problem, is_error=True)
            elif call.tool == tools.NARRATE:
                text = str(call.input.get("text", ""))[:20_000]
                cp.outbox.append(
                    AgentNarrated(
                        event_id=stable_id(cp.build_id, "narrated", call.call_id),
                        build_id=cp.build_id,
                        user_id=cp.user_id,
                        causation_id=cause,
                        iteration=cp.iteration,
                        text=text,
                    )
                )
                cp.state.results[call.call_id] = Outcome(content="ok")
            else:
                cp.outbox.append(
                    ToolCall(
                        event_id=stable_id(cp.build_id, "tool_call", call.call_id),
                        build_id=cp.build_id,
                        user_id=cp.user_id,
                        causation_id=cause,
                        call_id=call.call_id,
                        iteration=cp.iteration,
                        tool=call.tool,  # type: ignore[arg-type]
                        input=call.input,
                        timeout_s=cp.limits.tool_timeout_s,
                    )
                )
        cp.status = "acting"
        if len(cp.state.results) == len(cp.state.pending):
            return self._observe(cp, cause)
        return []

    def _record(self, cp: Checkpoint, msg: ToolResult) -> list[Turn] | None:
        if cp.status != "acting" or msg.iteration != cp.iteration:
            return None  # stale, or the build ended
        if msg.call_id not in {c.call_id for c in cp.state.pending}:
            return None
        if msg.call_id in cp.state.results:
            return None  # a duplicate
        cp.state.results[msg.call_id] = Outcome(
            content=msg.output or "(no output)",
            is_error=msg.is_error,
            files_changed=msg.files_changed,
        )
        if len(cp.state.results) < len(cp.state.pending):
            return []
        return self._observe(cp, msg.event_id)

    def _observe(self, cp: Checkpoint, cause: uuid.UUID) -> list[Turn]:
        """The set is complete: one user turn with every result, in the order of the calls."""
        blocks = []
        changed = False
        for call in cp.state.pending:
            outcome = cp.state.results[call.call_id]
            changed = changed or bool(outcome.files_changed)
            blocks.append(
                {
                    "type": "tool_result",
                    "tool_use_id": call.call_id,
                    "content": outcome.content,
                    "is_error": outcome.is_error,
                }
            )
        cp.state.pending, cp.state.results = [], {}
        if changed:
            cp.outbox.append(
                self._checkpoint(cp, "files_changed", cause, ("files_changed", cp.iteration))
            )
        cp.status = "thinking"
        if cp.state.sleep is not None:
            self._go_to_sleep(cp, cause)
        return [self._turn(cp, "user", blocks)]

    # ------------------------------------------------------------------ endings and sleep

    def _go_to_sleep(self, cp: Checkpoint, cause: uuid.UUID) -> None:
        request = cp.state.sleep
        assert request is not None
        cp.state.sleeps += 1
        cp.state.sleep = None
        cp.status = "sleeping"
        cp.outbox.append(self._checkpoint(cp, "sleep", cause, ("sleep", cp.state.sleeps)))
        cp.outbox.append(
            BuildSleeping(
                event_id=stable_id(cp.build_id, "sleeping", cp.state.sleeps),
                build_id=cp.build_id,
                user_id=cp.user_id,
                causation_id=cause,
                reason=request.reason,
                wake_at=request.wake_at,
            )
        )

    def _finish(self, cp: Checkpoint, summary: str, cause: uuid.UUID) -> None:
        final = self._checkpoint(cp, "final", cause, ("final",))
        cp.status = "completed"
        cp.outbox += [
            final,
            BuildCompleted(
                event_id=stable_id(cp.build_id, "completed"),
                build_id=cp.build_id,
                user_id=cp.user_id,
                causation_id=cause,
                summary=summary or "(no summary)",
                iterations=cp.iteration,
                cost_micro_usd=cp.cost_micro_usd,
                final_checkpoint_id=final.event_id,
            ),
        ]

    def _fail(self, cp: Checkpoint, cause: uuid.UUID, reason: FailureReason, detail: str) -> None:
        log.info("build failed: %s %s", reason, detail, extra={"build_id": cp.build_id})
        cp.status = "failed"
        cp.state.detail = f"{reason}: {detail}"
        cp.state.pending, cp.state.results = [], {}
        cp.outbox.append(
            BuildFailed(
                event_id=stable_id(cp.build_id, "failed"),
                build_id=cp.build_id,
                user_id=cp.user_id,
                causation_id=cause,
                reason=reason,
                detail=detail[:4000],
                iterations=cp.iteration,
                cost_micro_usd=cp.cost_micro_usd,
            )
        )

    def _checkpoint(
        self, cp: Checkpoint, reason: Any, cause: uuid.UUID, key: tuple[object, ...]
    ) -> CheckpointSaved:
        return CheckpointSaved(
            event_id=stable_id(cp.build_id, "checkpoint", *key),
            build_id=cp.build_id,
            user_id=cp.user_id,
            causation_id=cause,
            iteration=cp.iteration,
            reason=reason,
        )

    # ------------------------------------------------------------------ plumbing

    async def _step(
        self,
        build_id: str,
        advance: Advance,
        *,
        publish: bool = True,
        first: Checkpoint | None = None,
        release: str | None = None,
        lease: str | None = None,
    ) -> Checkpoint | None:
        """Load, advance, save (retrying a lost race on fresh state), then publish (unless the
        caller publishes the returned checkpoint's outbox itself). ``first``: a checkpoint the
        caller has loaded, tried before reading it again; else the one this replica kept from
        the build's last message, if any. A change decided on either is checked by the save's
        version; "no change" is confirmed on a fresh read. ``release``: a lease token the save
        gives up. ``lease``: a token for which the save takes the think lease if the build is
        then thinking (the returned checkpoint's ``lease`` says whether it did)."""
        cp = first if first is not None else self.kept.recall(build_id)
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
            take = lease if cp.status == "thinking" else None
            try:
                took = await self.store.save(
                    cp, new_turns, release=release, take=take, ttl_s=self.lease_s
                )
            except VersionConflict:
                log.info("version conflict; re-applying", extra={"build_id": build_id})
                cp = None
                continue
            cp.lease = take if took else None
            if cp.terminal or cp.status == "sleeping":
                self.kept.forget(build_id)  # a sleeping or finished build holds no memory here
            else:
                self.kept.saved(cp, new_turns)
            if publish:
                # a failure here leaves a lease this save took to run out (lease_s): the
                # redelivery of the message then waits for it
                await self._flush(cp)
            return cp
        raise Conflict(f"build {build_id} kept changing under {self.save_attempts} attempts")

    async def _flush(self, cp: Checkpoint, *, keep: bool = False) -> None:
        """Publish the outbox, then clear it in the row. ``keep``: the handler is done with ``cp``;
        it is kept for the build's next message as soon as everything is published (a result
        answering a ToolCall just published often arrives before the clearing is done; a save
        from the kept checkpoint overwrites the published outbox, so the clearing may lose)."""
        if cp.outbox:
            for msg in cp.outbox:
                await self.publisher.publish(msg)
            cp.outbox, version = [], cp.version
            if keep:
                self.kept.remember(cp)
            await self.store.mark_sent(cp.build_id, version)
        elif keep:
            self.kept.remember(cp)

    def _turn(self, cp: Checkpoint, role: Any, content: list[dict[str, Any]]) -> Turn:
        turn = Turn(cp.turns, role, content)
        cp.turns += 1
        return turn

    def _cap(self, cp: Checkpoint) -> int | None:
        if cp.limits.max_cost_micro_usd is not None:
            return cp.limits.max_cost_micro_usd
        tier = self.kiln.tiers.get(cp.tier)
        return tier.per_build_cap_micro_usd if tier else None

    def _new_checkpoint(self, msg: BuildRequested) -> Checkpoint:
        tier = self.kiln.tiers.get(msg.tier)
        return Checkpoint(
            build_id=msg.build_id,
            user_id=msg.user_id,
            tier=msg.tier,
            model=(tier.models.get("agent", "") if tier else ""),
            limits=msg.limits,
            system=self.config.system(msg.idea_brief, msg.understanding_qna),
        )

    def _request(self, cp: Checkpoint, turns: list[Turn]) -> ModelRequest:
        return build_request(cp, turns, self.tools, self.config)


def _clean(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep what the next request may send back: text and tool_use blocks, minimal fields."""
    out: list[dict[str, Any]] = []
    for b in content:
        if b.get("type") == "text" and b.get("text"):
            out.append({"type": "text", "text": b["text"]})
        elif b.get("type") == "tool_use":
            raw = b.get("input")
            out.append(
                {
                    "type": "tool_use",
                    "id": b["id"],
                    "name": b["name"],
                    "input": raw if isinstance(raw, dict) else {},
                }
            )
    return out


def _text(content: list[dict[str, Any]]) -> str:
    return "\n".join(b["text"] for b in content if b["type"] == "text").strip()


def _caused(msg: Envelope, cls: type[Any], event_id: uuid.UUID, **fields: Any) -> Any:
    return msg.caused(cls, **fields).with_id(event_id)
