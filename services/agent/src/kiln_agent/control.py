"""The build's start (or its rejection behind a closed budget gate), the commands from outside
(cancel, sleep, wake) and what gates a think (the limits, a sleep before the call, a model change,
compaction), as plain functions on the checkpoint like ``transitions.py``: no I/O; each returns the
new turns ([] for none), or None when the input changes nothing."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from kiln_contracts import (
    BudgetGate,
    BuildCancelled,
    BuildRequested,
    BuildResumed,
    CancelRequested,
    SleepRequested,
    WakeRequested,
    stable_id,
)
from kiln_contracts.messages import FailureReason

from . import endings, gates
from .checkpoint import Checkpoint, SleepRequest, Turn
from .transitions import Rules, turn

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
        return []
    if cp.state.sleep is not None and not cp.terminal:
        cp.state.sleep = None  # woken before the pending sleep took effect
        return []
    return None


# ---------------------------------------------------------------------------- think


def precheck(rules: Rules, cp: Checkpoint) -> tuple[FailureReason, str] | None:
    """Why the build may not call the model again, if it may not."""
    if not cp.model:
        return "internal", f"unknown tier {cp.tier!r}"
    if cp.iteration >= cp.limits.max_iterations:
        return "iteration_limit", f"reached {cp.limits.max_iterations} iterations"
    cap = rules.cap(cp)
    if cap is not None and cp.cost_micro_usd >= cap:
        return "cost_limit", f"spent {cp.cost_micro_usd} of {cap} micro-USD"
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


def compact(cp: Checkpoint, iteration: int, point: int) -> list[Turn] | None:
    """Move the compaction watermark to ``point`` (if the build is still at ``iteration``)."""
    if cp.status != "thinking" or cp.iteration != iteration:
        return None
    cp.state.compacted_before = max(cp.state.compacted_before, point)
    cp.state.context_tokens, cp.state.compact_now = None, False
    return []


def _caused(msg: Any, cls: type[Any], event_id: uuid.UUID, **fields: Any) -> Any:
    return msg.caused(cls, **fields).with_id(event_id)
