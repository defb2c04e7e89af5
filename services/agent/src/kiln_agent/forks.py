"""A fork's start: its checkpoint and conversation from its source's, up to the iteration it
forks at, and why a fork cannot be made. Plain functions, no I/O."""

from __future__ import annotations

from typing import Any

from kiln_contracts import (
    BuildRequested,
)

from .checkpoint import Checkpoint, Turn
from .transitions import Rules, turn

# ---------------------------------------------------------------------------- start


def fork(
    rules: Rules, msg: BuildRequested, source: Checkpoint, source_turns: list[Turn]
) -> tuple[Checkpoint, list[Turn]]:
    """A fork's checkpoint and turns: the source's conversation up to the fork's iteration N
    (every turn as stored, thinking blocks and their signatures untouched), then one user turn: a
    result for each call of the last kept reply still without one, and a note that this is a fork
    of that build at N in a sandbox restored from its snapshot. The system prompt and model are
    the source's (the turns are bound to them); iterations are numbered on from N, and the
    limits count from there (a new allowance, as for a continuation)."""
    origin = msg.fork
    assert origin is not None
    tier = rules.kiln.tiers.get(msg.tier)
    cp = Checkpoint(
        build_id=msg.build_id,
        user_id=msg.user_id,
        tier=msg.tier,
        model=source.model or (tier.models.get("agent", "") if tier else ""),
        limits=msg.limits,
        system=source.system,
        iteration=origin.iteration,
    )
    cp.state.effort = (
        source.state.effort if source.model else (tier.effort.get("agent") if tier else None)
    )
    cp.state.fork = origin
    cp.state.run_iteration = origin.iteration
    kept = turns_until(source_turns, origin.iteration)
    turns = [Turn(i, t.role, t.content, t.iteration) for i, t in enumerate(kept)]
    cp.turns = len(turns)
    cp.state.compacted_before = min(source.state.compacted_before, cp.turns)
    if source.state.summary is not None and source.state.summarised_before <= cp.turns:
        # the source's summary of its oldest turns covers only kept ones: sent as it was
        cp.state.summarised_before = source.state.summarised_before
        cp.state.summary = source.state.summary
    blocks: list[dict[str, Any]] = []
    if turns and turns[-1].role == "assistant":
        blocks += [
            {
                "type": "tool_result",
                "tool_use_id": b["id"],
                "content": rules.config.fork_no_result.strip(),
                "is_error": True,
            }
            for b in turns[-1].content
            if b.get("type") == "tool_use"
        ]
    note = rules.config.forked_note(
        source.build_id, origin.iteration, origin.snapshot_id, cp.limits.max_iterations
    )
    blocks.append({"type": "text", "text": note})
    turns.append(turn(cp, "user", blocks))
    return cp, turns


def turns_until(turns: list[Turn], iteration: int) -> list[Turn]:
    """The turns recorded at ``iteration`` or before, in order (a turn stored before turns kept
    their iteration counts as that of the assistant turns up to it)."""
    kept: list[Turn] = []
    at = 0
    for t in turns:
        if t.iteration is not None:
            at = t.iteration
        elif t.role == "assistant":
            at += 1
        if at > iteration:
            break
        kept.append(t)
    return kept


def refusal(msg: BuildRequested, source: Checkpoint | None) -> str | None:
    """Why ``msg`` cannot fork ``source`` (None: it can)."""
    origin = msg.fork
    assert origin is not None
    if source is None or source.user_id != msg.user_id:  # another user's: as if there were none
        return f"no build {origin.build_id} to fork"
    if source.status == "rejected":
        return f"build {origin.build_id} never started"
    if origin.iteration > source.iteration:
        return (
            f"build {origin.build_id} has reached iteration {source.iteration}, "
            f"not {origin.iteration}"
        )
    return None
