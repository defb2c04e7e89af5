"""The build's start (or its rejection behind a closed budget gate), the commands from outside
(cancel, sleep, wake, a user's message and the continuation it starts) and what gates a think (the
limits, a sleep before the call, a model change; compaction is ``compaction.py``), as plain
functions on the checkpoint like ``transitions.py``: no I/O; each returns the new turns ([] for
none), or None when the input changes nothing."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from kiln_contracts import (
    BudgetGate,
    BuildCancelled,
    BuildContinued,
    BuildRequested,
    BuildResumed,
    CancelRequested,
    SendUserMessage,
    SleepRequested,
    WakeRequested,
    stable_id,
)
from kiln_contracts.messages import FailureReason

from . import endings, gates
from .checkpoint import Checkpoint, SleepRequest, Turn, Waiting
from .transitions import Rules, take_inbox, turn

# ---------------------------------------------------------------------------- start


def start(rules: Rules, msg: BuildRequested) -> tuple[Checkpoint, list[Turn]]:
    """A new build's checkpoint and its first turn: the model and effort of its tier."""
    tier = rules.kiln.tiers.get(msg.tier)
    cp = Checkpoint(
        build_id=msg.build_id,
        user_id=msg.user_id,
        tier=msg.tier,
        model=(tier.models.get("agent", "") if tier else ""),
        limits=msg.limits,
        system=rules.config.system(msg.idea_brief, msg.understanding_qna),
    )
    cp.state.effort = tier.effort.get("agent") if tier else None
    first = turn(cp, "user", [{"type": "text", "text": rules.config.first_turn(msg.build_id)}])
    return cp, [first]


def reject(cp: Checkpoint, msg: BuildRequested, gate: BudgetGate) -> list[Turn]:
    """A new build behind its user's closed budget gate: it never starts (no turn), for good."""
    cp.status, cp.turns = "rejected", 0
    cp.outbox.append(gates.rejection(msg, gate))
    return []


# ---------------------------------------------------------------------------- control


def cancel(cp: Checkpoint, msg: CancelRequested) -> list[Turn] | None:
    if cp.terminal:
        return None
    cp.status = "cancelled"
    # the iteration's calls stay (state.pending): a continuation answers those without a result
    cp.outbox.append(
        _caused(
            msg,
            BuildCancelled,
            stable_id(cp.build_id, "cancelled", *endings.run(cp)),
            reason=msg.reason,
            iterations=cp.iteration,
            cost_micro_usd=cp.cost_micro_usd,
            continuation=cp.state.continuations,
        )
    )
    return []


def sleep(cp: Checkpoint, msg: SleepRequested) -> list[Turn] | None:
    """Sleep before the build's next model call: a call in flight is answered and its reply kept
    (it is paid for, and charged), and the build sleeps at its next think (``sleep_before_call``)
    or as soon as the iteration's set completes."""
    if cp.terminal or cp.status == "sleeping" or cp.state.sleep is not None:
        return None
    cp.state.sleep = SleepRequest(reason=msg.reason, wake_at=msg.wake_at)
    return []


def wake(cp: Checkpoint, msg: WakeRequested) -> list[Turn] | None:
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
        if cp.state.inbox:  # the messages that came while it slept: read at this think
            return [turn(cp, "user", take_inbox(cp))]
        return []
    if cp.state.sleep is not None and not cp.terminal:
        cp.state.sleep = None  # woken before the pending sleep took effect
        return []
    return None


# ---------------------------------------------------------------------------- messages


def message(rules: Rules, cp: Checkpoint, msg: SendUserMessage) -> list[Turn] | None:
    """Take the build's next user message (``seq`` one past the last taken; anything else is
    None: a duplicate, or one that must wait for those before it). A build that has ended
    continues with it; otherwise it waits in the inbox until the conversation can take it: after
    the results of the iteration in flight, after the reply of a model call in flight, at the
    wake of a sleeping build."""
    if msg.seq != cp.state.messages + 1:
        return None
    cp.state.messages = msg.seq
    if cp.status == "rejected":
        return []  # it never started (no allowance): taken, not answered; the gateway refuses it
    cp.state.inbox.append(Waiting(message_id=msg.message_id, seq=msg.seq, text=msg.text))
    if cp.terminal:
        return [continue_build(rules, cp, msg)]
    return []


def place(cp: Checkpoint) -> list[Turn] | None:
    """The waiting messages as a user turn now, for a thinking build with no call in flight (the
    caller holds the think lease)."""
    if cp.status != "thinking" or not cp.state.inbox:
        return None
    return [turn(cp, "user", take_inbox(cp))]


def continue_build(rules: Rules, cp: Checkpoint, msg: SendUserMessage) -> Turn:
    """Continue an ended build with the waiting messages: one user turn with a result for each
    call of the last iteration still without one, a note (fresh sandbox restored from the latest
    snapshot, the new allowance), then the messages. The limits count from here."""
    ended = cp.status
    blocks: list[dict[str, Any]] = []
    for call in cp.state.pending:
        outcome = cp.state.results.get(call.call_id)
        blocks.append(
            {
                "type": "tool_result",
                "tool_use_id": call.call_id,
                "content": outcome.content if outcome else rules.config.unanswered(ended),
                "is_error": outcome.is_error if outcome else True,
            }
        )
    note = rules.config.continued_note(ended, cp.limits.max_iterations)
    blocks += [{"type": "text", "text": note}, *take_inbox(cp)]
    state = cp.state
    state.continuations += 1
    state.run_iteration, state.run_cost_micro_usd = cp.iteration, cp.cost_micro_usd
    state.pending, state.results, state.sleep, state.detail = [], {}, None, ""
    state.streak_call, state.streak, state.compact_now = None, 0, False
    cp.status = "thinking"
    cp.outbox.append(
        _caused(
            msg,
            BuildContinued,
            stable_id(cp.build_id, "continued", state.continuations),
            continuation=state.continuations,
            after=ended,
            message_id=msg.message_id,
            iterations=cp.iteration,
            cost_micro_usd=cp.cost_micro_usd,
        )
    )
    return turn(cp, "user", blocks)


# ---------------------------------------------------------------------------- think


def precheck(rules: Rules, cp: Checkpoint) -> tuple[FailureReason, str] | None:
    """Why the build may not call the model again, if it may not."""
    if not cp.model:
        return "internal", f"unknown tier {cp.tier!r}"
    # a continuation's limits are a new allowance: counted from where its run started
    if rules.run_iterations(cp) >= cp.limits.max_iterations:
        return "iteration_limit", f"reached {cp.limits.max_iterations} iterations"
    cap = rules.cap(cp)
    if cap is not None and (spent := rules.run_cost(cp)) >= cap:
        return "cost_limit", f"spent {spent} of {cap} micro-USD"
    return None


def gate_sleep(gate: BudgetGate) -> SleepRequest:
    """Behind a closed gate: asleep until it opens, as the budget's SleepRequested would say."""
    return SleepRequest(reason=gate.sleep_reason, wake_at=gate.until)


def sleep_before_call(
    cp: Checkpoint, sleep: SleepRequest, iteration: int, cause: uuid.UUID
) -> list[Turn] | None:
    """No model call: asleep now (a sleep asked for, or the gate's), if still at ``iteration``."""
    if cp.status != "thinking" or cp.iteration != iteration:
        return None
    cp.state.sleep = cp.state.sleep or sleep
    endings.go_to_sleep(cp, cause)
    return []


def model_switch(rules: Rules, cp: Checkpoint) -> Callable[[Checkpoint], None] | None:
    """The move to the tier's model if kiln.yaml now names another one than the build's (at
    this think, with the whole conversation, thinking blocks included: the API drops those the
    new model cannot read), else None."""
    tier = rules.kiln.tiers.get(cp.tier)
    model = tier.models.get("agent") if tier else None
    if not model or model == cp.model or not cp.model:
        return None
    effort = tier.effort.get("agent") if tier else None

    def switch(c: Checkpoint) -> None:
        if c.model != model:
            c.model, c.state.effort = model, effort
            c.state.context_tokens = None  # another model counts tokens its own way

    return switch


def _caused(msg: Any, cls: type[Any], event_id: uuid.UUID, **fields: Any) -> Any:
    return msg.caused(cls, **fields).with_id(event_id)
