"""Compaction, as plain functions like ``transitions.py`` (no I/O): whether a think's request fits
the model's window or must be compacted first (old tool output and file contents cleared, or the
oldest turns summarised by a model call), and the transitions that move the watermarks."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kiln_contracts import IterationCompleted, stable_id
from kiln_contracts.messages import FailureReason
from kiln_runtime.config import Cost, ModelSpec

from . import context, endings
from .checkpoint import Checkpoint, Turn
from .context import build_request, compaction_point, context_tokens, summary_point
from .ports import ContextWindowExceeded, ModelError, ModelReply, ModelRequest
from .transitions import Rules, take_inbox, turn


@dataclass(frozen=True)
class Fit:
    """What a think does next: call with ``request``; fail with ``failure``; summarise first
    (``summary``: the turns to summarise up to, the clearing watermark); or clear the turns
    before ``clear`` first (the request was ~``size`` tokens of ``window``), then ``refit``."""

    request: ModelRequest | None = None
    failure: tuple[FailureReason, str] | None = None
    summary: tuple[int, int] | None = None
    clear: int | None = None
    size: int = 0
    window: int = 0


def fit(rules: Rules, tools: list[dict[str, Any]], cp: Checkpoint, turns: list[Turn]) -> Fit:
    """The request, compacted first if it would pass ``compact_at`` of the window (or the last
    call overflowed): old tool output and file contents cleared, or, if that is not enough, the
    fewest oldest turns summarised; a context_window failure if it cannot fit."""
    request = model_request(rules, tools, cp, turns)
    window = rules.window(cp.model)
    size = context_tokens(cp, turns, request)
    if cp.state.compact_now or size > rules.config.compact_at * window:
        point = compaction_point(cp, turns, rules.config)
        cleared = max(cp.state.compacted_before, point or 0)
        upto = summary_point(cp, turns, request, rules.config, window, cleared)
        if upto is None and point is None and cp.state.compact_now:
            # the API counted more than the estimate: nothing to clear, so summarise
            upto = summary_point(cp, turns, request, rules.config, window, cleared, force=True)
        if upto is not None:
            return Fit(summary=(upto, cleared))
        if point is not None:
            return Fit(clear=point, size=size, window=window)
        if cp.state.compact_now:
            return Fit(
                failure=(
                    "context_window",
                    f"the conversation overflowed the {window}-token window of {cp.model} "
                    "and nothing is left to clear or summarise",
                )
            )
    return _within(cp, request, size, window)


def refit(rules: Rules, tools: list[dict[str, Any]], cp: Checkpoint, turns: list[Turn]) -> Fit:
    """The request once old turns are cleared (``cp`` saved with its new watermark): it is sent
    if it fits the window."""
    request = model_request(rules, tools, cp, turns)
    return _within(cp, request, context_tokens(cp, turns, request), rules.window(cp.model))


def _within(cp: Checkpoint, request: ModelRequest, size: int, window: int) -> Fit:
    if size > window:
        return Fit(
            failure=(
                "context_window",
                f"~{size} tokens do not fit the {window}-token window of {cp.model}",
            )
        )
    return Fit(request=request)


def model_request(
    rules: Rules, tools: list[dict[str, Any]], cp: Checkpoint, turns: list[Turn]
) -> ModelRequest:
    """The turn's Messages request."""
    return build_request(cp, turns, tools, rules.config, _spec(rules, cp))


def summary_call(rules: Rules, cp: Checkpoint, turns: list[Turn], upto: int) -> ModelRequest:
    """The summarising call's request: turns 1 to ``upto`` (excluded), no tools."""
    return context.summary_request(cp, turns, rules.config, _spec(rules, cp), upto)


def _spec(rules: Rules, cp: Checkpoint) -> ModelSpec | None:
    name = rules.kiln.resolve(cp.model)
    return rules.kiln.models[name] if name else None


def compact(cp: Checkpoint, iteration: int, point: int) -> list[Turn] | None:
    """Move the compaction watermark to ``point`` (if the build is still at ``iteration``)."""
    if cp.status != "thinking" or cp.iteration != iteration:
        return None
    cp.state.compacted_before = max(cp.state.compacted_before, point)
    cp.state.context_tokens, cp.state.compact_now = None, False
    return []


def summarised(
    cp: Checkpoint,
    at: tuple[int, int],
    upto: int,
    cleared_before: int,
    reply: ModelReply | ModelError,
    priced: tuple[datetime, Cost] | None,
    cause: uuid.UUID,
) -> list[Turn] | None:
    """The reply of a summarising call (made at ``at`` = (iteration, turns), if the build is still
    there): charged like any call (an IterationCompleted of purpose ``summary``, its id stable per
    summary, so a republish is charged once), then turns 1 to ``upto`` (excluded) are sent as the
    summary and the clearing watermark moves to ``cleared_before``; the user's messages that
    came meanwhile join the conversation as a user turn. A failed call, or a reply with no text,
    summarises nothing: the build fails (context_window, or model_error) rather than ask again."""
    if cp.status != "thinking" or (cp.iteration, cp.turns) != at:
        return None
    if isinstance(reply, ModelError):
        reason: FailureReason = (
            "context_window" if isinstance(reply, ContextWindowExceeded) else "model_error"
        )
        endings.fail(cp, cause, reason, f"the summarising call failed: {reply}")
        return []
    assert priced is not None
    when, cost = priced
    state = cp.state
    state.summaries += 1
    cp.cost_micro_usd += cost.micro_usd
    cp.outbox.append(
        IterationCompleted(
            event_id=stable_id(cp.build_id, "summary", state.summaries),
            build_id=cp.build_id,
            user_id=cp.user_id,
            causation_id=cause,
            iteration=max(1, cp.iteration),
            model=reply.model,
            usage=reply.usage,
            stop_reason=reply.stop_reason,
            cost_micro_usd=cost.micro_usd,
            occurred_at=when,
            purpose="summary",
        )
    )
    text = context.summary_text(reply.content)
    if not text or reply.stop_reason not in ("end_turn", "max_tokens", "stop_sequence"):
        endings.fail(
            cp,
            cause,
            "context_window",
            f"the summarising call gave no summary ({reply.stop_reason})",
        )
        return []
    state.summary = text
    state.summarised_before = max(state.summarised_before, upto)
    state.compacted_before = max(state.compacted_before, cleared_before, upto)
    state.context_tokens, state.compact_now = None, False
    # the user's messages that came during the call: read at the next think, as after a reply
    return [turn(cp, "user", take_inbox(cp))] if state.inbox else []
