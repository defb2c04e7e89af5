"""What the watchdog does to a build that has stopped moving: plain functions on the checkpoint.

A build that wants to move (thinking, acting) and has not changed for a while, with no model
call running for it, has lost the message that would move it on: its ToolCall dead-lettered (no
sandbox to be had), a ToolResult or a wake lost. Each nudge retries what can help: a thinking
build thinks again; an acting one has the calls still without a result sent again (the sandbox
runs a call once, by its call id: one that ran answers with its stored result, one cut short as
interrupted). Nudges come further apart each time (``idle_s``, then twice, four times that);
after ``retries`` of them with no progress the build fails, reason ``stalled``, which ends it
everywhere (its sandbox stopped, its concurrency slot freed, the user told on its stream).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from . import endings, transitions
from .checkpoint import Checkpoint, PendingCall, Stall, Turn
from .ports import Idle


@dataclass(frozen=True)
class Watch:
    idle_s: float
    """How long a build may stay unchanged before its first nudge."""
    retries: int
    """Nudges before it fails (0: it fails at the first)."""


def due(cp: Checkpoint, idle: Idle, watch: Watch) -> bool:
    """The build is as the sweep saw it, and idle long enough for its next nudge (an acting one
    at least twice its tool timeout: a long call may be running)."""
    if cp.version != idle.version or cp.status not in ("thinking", "acting"):
        return False
    wait = watch.idle_s * 2 ** retries(cp)
    if cp.status == "acting":
        wait = max(wait, 2 * cp.limits.tool_timeout_s)
    return idle.idle_s >= wait


def retries(cp: Checkpoint) -> int:
    """The nudges since the build last moved."""
    stall = cp.state.stall
    return stall.retries if stall is not None and stall.version == cp.version else 0


def nudge(cp: Checkpoint, idle: Idle, watch: Watch, cause: uuid.UUID) -> list[Turn] | None:
    """Retry, or fail the build after ``watch.retries`` nudges; None if it is not due."""
    if not due(cp, idle, watch):
        return None
    done = retries(cp)
    if done >= watch.retries:
        cp.state.stall = None
        endings.fail(cp, cause, "stalled", _what(cp, idle.idle_s, done))
        return []
    cp.state.stall = Stall(version=cp.version + 1, retries=done + 1)
    if cp.status == "acting":
        cp.outbox += [
            transitions.tool_call(cp, call, cause, retry=cp.version) for call in unanswered(cp)
        ]
    return []


def unanswered(cp: Checkpoint) -> list[PendingCall]:
    return [c for c in cp.state.pending if c.call_id not in cp.state.results]


def _what(cp: Checkpoint, idle_s: float, tried: int) -> str:
    again = f"; retried {tried} time{'s' if tried != 1 else ''}" if tried else ""
    if cp.status == "acting":
        calls = unanswered(cp)
        named = ", ".join(f"{c.tool} ({c.call_id})" for c in calls[:3])
        more = f" and {len(calls) - 3} more" if len(calls) > 3 else ""
        return (
            f"no progress for {idle_s:.0f} s: no result for {named}{more}{again} (a ToolCall "
            "that could not get a sandbox is a dead letter: kiln dlq list)"
        )
    return f"no progress for {idle_s:.0f} s: no model call was made{again}"
