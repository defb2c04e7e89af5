"""The build's state machine as plain functions, no I/O: each takes the checkpoint (a working copy
the driver loaded) and an input, changes the checkpoint, puts the messages it produces in its
outbox and returns the new turns ([] for none), or None when the input changes nothing. This
module holds the iteration (a model reply, its tool calls, their results); ``control.py`` the
start, the commands from outside (cancel, sleep, wake) and what gates a think.

The driver (``loop.py``) loads, calls one of these, saves the result and publishes the outbox.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kiln_contracts import IterationCompleted, ToolCall, ToolResult, stable_id
from kiln_runtime.config import Cost, KilnConfig

from . import endings, repetition, tools
from .checkpoint import Checkpoint, Outcome, PendingCall, Turn
from .config import AgentConfig
from .ports import ModelReply

Advance = Callable[[Checkpoint], list[Turn] | None]
"""A step: change the checkpoint and return the new turns ([] for none), or None for no change."""

CONTINUE = "Your reply was cut off by the token limit. Continue where you stopped."
THINKING = frozenset({"thinking", "redacted_thinking"})


@dataclass(frozen=True)
class Rules:
    """What the transitions read: the agent's prompts and limits, the tiers and models."""

    config: AgentConfig
    kiln: KilnConfig

    def cap(self, cp: Checkpoint) -> int | None:
        """The build's cost cap in micro-dollars (its own limit, else its tier's)."""
        if cp.limits.max_cost_micro_usd is not None:
            return cp.limits.max_cost_micro_usd
        tier = self.kiln.tiers.get(cp.tier)
        return tier.per_build_cap_micro_usd if tier else None

    @staticmethod
    def run_cost(cp: Checkpoint) -> int:
        """What the current run has spent (a continuation's cap is a new allowance)."""
        return cp.cost_micro_usd - cp.state.run_cost_micro_usd

    @staticmethod
    def run_iterations(cp: Checkpoint) -> int:
        """The iterations of the current run (a continuation's limit is a new allowance)."""
        return cp.iteration - cp.state.run_iteration

    def window(self, model: str) -> int:
        name = self.kiln.resolve(model)
        return self.config.window(model, self.kiln.models[name].context_window if name else None)


def reply(
    rules: Rules,
    cp: Checkpoint,
    answer: ModelReply,
    priced: tuple[datetime, Cost],
    cause: uuid.UUID,
) -> list[Turn]:
    """Advance by one model reply (``priced``: when it came, and its cost at that time's price):
    the assistant turn, then act on its stop reason."""
    at, cost = priced
    cp.iteration += 1
    cp.cost_micro_usd += cost.micro_usd
    cp.outbox.append(
        IterationCompleted(
            event_id=stable_id(cp.build_id, "iteration", cp.iteration),
            build_id=cp.build_id,
            user_id=cp.user_id,
            causation_id=cause,
            iteration=cp.iteration,
            model=answer.model,
            usage=answer.usage,
            stop_reason=answer.stop_reason,
            cost_micro_usd=cost.micro_usd,
            occurred_at=at,
        )
    )
    cap = rules.cap(cp)
    if cap is not None and (spent := rules.run_cost(cp)) > cap:
        endings.fail(cp, cause, "cost_limit", f"spent {spent} of {cap} micro-USD")
        return []
    stop = answer.stop_reason
    if stop == "model_context_window_exceeded":
        cp.state.compact_now = True  # the partial reply is dropped; compact, then ask again
        return []
    content = kept_blocks(answer.content)
    calls = [b for b in content if b["type"] == "tool_use"]
    if stop in ("max_tokens", "pause_turn"):
        content = [b for b in content if b["type"] != "tool_use"]
        if all(b["type"] in THINKING for b in content):
            content.append({"type": "text", "text": "(cut off)"})
    endings.narrate_thinking(cp, content, cause)
    turns = [turn(cp, "assistant", content)]
    u = answer.usage
    cp.state.context_tokens = (
        u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens + u.output_tokens
    )
    cp.state.context_turns = cp.turns
    if stop == "tool_use" and calls:
        turns += act(rules, cp, calls, cause)
    elif stop in ("end_turn", "stop_sequence") and cp.state.inbox:
        # a user message came during the call: it is answered, the build goes on
        endings.narrate_reply(cp, content, cause)
        turns.append(turn(cp, "user", take_inbox(cp)))
    elif stop in ("end_turn", "stop_sequence"):
        endings.finish(cp, endings.text_of(content), cause)
    elif stop == "max_tokens":
        turns.append(turn(cp, "user", [{"type": "text", "text": CONTINUE}, *take_inbox(cp)]))
    elif stop == "pause_turn":
        pass  # the request ends with this assistant turn: the model carries on from it
    elif stop == "refusal":
        endings.fail(cp, cause, "model_refusal", endings.text_of(content)[:2000])
    else:
        endings.fail(cp, cause, "model_error", f"unexpected stop_reason {stop!r}")
    return turns


def kept_blocks(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reply's blocks as the next request sends them back: every block as received, in its
    place (thinking and redacted_thinking blocks, signatures included, are never altered: the
    API refuses a turn whose thinking changed); only empty text blocks are left out (the API
    refuses those), and a tool_use input that is not an object is sent as {}."""
    out: list[dict[str, Any]] = []
    for b in content:
        kind = b.get("type")
        if kind == "text" and not b.get("text"):
            continue
        if kind == "tool_use" and not isinstance(b.get("input"), dict):
            b = {**b, "input": {}}
        out.append(b)
    return out


# ---------------------------------------------------------------------------- act, observe


def act(rules: Rules, cp: Checkpoint, calls: list[dict[str, Any]], cause: uuid.UUID) -> list[Turn]:
    """One ToolCall per valid tool_use block. Narrate, unknown tools and input that fails the
    tool's schema are answered here (the last two as errors), without the sandbox."""
    cp.state.results = {}
    # every call of the turn is pending before any check: an ending here leaves them all for a
    # continuation to answer
    cp.state.pending = [
        PendingCall(call_id=b["id"], tool=b["name"], input=b["input"]) for b in calls
    ]
    for call in cp.state.pending:
        if (streak := repetition.count(cp.state, call, rules.config.repetition_limit)) is not None:
            endings.fail(cp, cause, "repetition", streak)
            return []
        if call.tool not in tools.SANDBOX_TOOLS and call.tool != tools.NARRATE:
            cp.state.results[call.call_id] = Outcome(
                content=f"unknown tool {call.tool!r}", is_error=True
            )
        elif (problem := tools.input_error(call.tool, call.input)) is not None:
            # answered here: a call the sandbox would refuse never reaches it
            cp.state.results[call.call_id] = Outcome(content=problem, is_error=True)
        elif call.tool == tools.NARRATE:
            endings.narrate(cp, call.call_id, str(call.input.get("text", "")), cause)
            cp.state.results[call.call_id] = Outcome(content="ok")
        else:
            cp.outbox.append(tool_call(cp, call, cause))
    cp.status = "acting"
    if len(cp.state.results) == len(cp.state.pending):
        return observe(cp, cause)
    return []


def tool_call(
    cp: Checkpoint, call: PendingCall, cause: uuid.UUID, retry: int | None = None
) -> ToolCall:
    """The ToolCall for a pending call of the current iteration. ``retry``: it is sent again by
    the save of this version (a new event id; the sandbox runs a call once whatever the id, by
    its call id)."""
    again = ("retry", retry) if retry is not None else ()
    return ToolCall(
        event_id=stable_id(cp.build_id, "tool_call", call.call_id, *again),
        build_id=cp.build_id,
        user_id=cp.user_id,
        causation_id=cause,
        call_id=call.call_id,
        iteration=cp.iteration,
        tool=call.tool,  # type: ignore[arg-type]
        input=call.input,
        timeout_s=cp.limits.tool_timeout_s,
        restore_from=cp.state.fork,
    )


def record(cp: Checkpoint, msg: ToolResult) -> list[Turn] | None:
    """A result of the current iteration; the user turn of results once the set is complete."""
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
    return observe(cp, msg.event_id)


def observe(cp: Checkpoint, cause: uuid.UUID) -> list[Turn]:
    """The set is complete: one user turn with every result, in the order of the calls, then the
    user's messages waiting."""
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
    blocks += take_inbox(cp)  # the user's messages that came meanwhile, after the results
    cp.state.pending, cp.state.results = [], {}
    if changed:
        cp.outbox.append(
            endings.checkpoint_saved(cp, "files_changed", cause, ("files_changed", cp.iteration))
        )
    cp.status = "thinking"
    if cp.state.sleep is not None:
        endings.go_to_sleep(cp, cause)
    return [turn(cp, "user", blocks)]


# ---------------------------------------------------------------------------- helpers


def take_inbox(cp: Checkpoint) -> list[dict[str, Any]]:
    """The user's waiting messages as text blocks, in order; the inbox is empty afterwards."""
    blocks = [{"type": "text", "text": m.text} for m in cp.state.inbox]
    cp.state.inbox = []
    return blocks


def turn(cp: Checkpoint, role: Any, content: list[dict[str, Any]]) -> Turn:
    turn = Turn(cp.turns, role, content, cp.iteration)
    cp.turns += 1
    return turn
