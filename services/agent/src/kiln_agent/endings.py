"""The messages a transition puts in the outbox besides tool calls: how a build ends (completed,
failed), goes to sleep, saves a checkpoint for the snapshot service, and narrates. Plain functions
on the checkpoint, no I/O."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from kiln_contracts import (
    AgentNarrated,
    BuildCompleted,
    BuildFailed,
    BuildSleeping,
    CheckpointSaved,
    stable_id,
)
from kiln_contracts.messages import FailureReason

from .checkpoint import Checkpoint

log = logging.getLogger(__name__)


def run(cp: Checkpoint) -> tuple[int, ...]:
    """What tells the current run's ending apart from an earlier run's in the ids of its messages:
    nothing for the first run (its ids are as they always were), the continuation's number after."""
    return (cp.state.continuations,) if cp.state.continuations else ()


def finish(cp: Checkpoint, summary: str, cause: uuid.UUID) -> None:
    final = checkpoint_saved(cp, "final", cause, ("final", *run(cp)))
    cp.status = "completed"
    cp.outbox += [
        final,
        BuildCompleted(
            event_id=stable_id(cp.build_id, "completed", *run(cp)),
            build_id=cp.build_id,
            user_id=cp.user_id,
            causation_id=cause,
            summary=summary or "(no summary)",
            iterations=cp.iteration,
            cost_micro_usd=cp.cost_micro_usd,
            final_checkpoint_id=final.event_id,
            continuation=cp.state.continuations,
        ),
    ]


def fail(cp: Checkpoint, cause: uuid.UUID, reason: FailureReason, detail: str) -> None:
    log.info("build failed: %s %s", reason, detail, extra={"build_id": cp.build_id})
    cp.status = "failed"
    cp.state.detail = f"{reason}: {detail}"
    # the iteration's calls stay (state.pending): a continuation answers those without a result
    cp.outbox.append(
        BuildFailed(
            event_id=stable_id(cp.build_id, "failed", *run(cp)),
            build_id=cp.build_id,
            user_id=cp.user_id,
            causation_id=cause,
            reason=reason,
            detail=detail[:4000],
            iterations=cp.iteration,
            cost_micro_usd=cp.cost_micro_usd,
            continuation=cp.state.continuations,
        )
    )


def go_to_sleep(cp: Checkpoint, cause: uuid.UUID) -> None:
    """Sleep as requested (``state.sleep``): a sleep checkpoint (the snapshot first), then
    BuildSleeping with the wake time."""
    request = cp.state.sleep
    assert request is not None
    cp.state.sleeps += 1
    cp.state.sleep = None
    cp.status = "sleeping"
    cp.outbox.append(checkpoint_saved(cp, "sleep", cause, ("sleep", cp.state.sleeps)))
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


def checkpoint_saved(
    cp: Checkpoint, reason: Any, cause: uuid.UUID, key: tuple[object, ...]
) -> CheckpointSaved:
    return CheckpointSaved(
        event_id=stable_id(cp.build_id, "checkpoint", *key),
        build_id=cp.build_id,
        user_id=cp.user_id,
        causation_id=cause,
        iteration=cp.iteration,
        reason=reason,
    )


def narrate(cp: Checkpoint, call_id: str, text: str, cause: uuid.UUID) -> None:
    """What the model told the user with its narrate tool."""
    cp.outbox.append(
        AgentNarrated(
            event_id=stable_id(cp.build_id, "narrated", call_id),
            build_id=cp.build_id,
            user_id=cp.user_id,
            causation_id=cause,
            iteration=cp.iteration,
            text=text[:20_000],
        )
    )


def narrate_thinking(cp: Checkpoint, content: list[dict[str, Any]], cause: uuid.UUID) -> None:
    """The progress the model wrote in its thinking (returned summarized: ``display``), and the
    text it wrote before tool calls, as one AgentNarrated of the iteration."""
    calls = any(b["type"] == "tool_use" for b in content)
    parts = [
        b["thinking"].strip()
        for b in content
        if b["type"] == "thinking" and isinstance(b.get("thinking"), str)
    ]
    if calls:
        parts += [b["text"].strip() for b in content if b["type"] == "text"]
    text = "\n\n".join(p for p in parts if p)
    if text:
        cp.outbox.append(
            AgentNarrated(
                event_id=stable_id(cp.build_id, "narrated", "thinking", cp.iteration),
                build_id=cp.build_id,
                user_id=cp.user_id,
                causation_id=cause,
                iteration=cp.iteration,
                text=text[:20_000],
                source="thinking",
            )
        )


def narrate_reply(cp: Checkpoint, content: list[dict[str, Any]], cause: uuid.UUID) -> None:
    """The text of a reply that ended the model's turn without ending the build (a user message
    waits to be answered): shown to the user, as a summary would have been."""
    text = text_of(content)
    if text:
        cp.outbox.append(
            AgentNarrated(
                event_id=stable_id(cp.build_id, "narrated", "reply", cp.iteration),
                build_id=cp.build_id,
                user_id=cp.user_id,
                causation_id=cause,
                iteration=cp.iteration,
                text=text[:20_000],
            )
        )


def text_of(content: list[dict[str, Any]]) -> str:
    return "\n".join(b["text"] for b in content if b["type"] == "text").strip()
