"""The builds read model: each event of the stream folded onto its build's projection, once per
stream sequence.
"""

from __future__ import annotations

import json
from dataclasses import replace

from kiln_contracts import (
    BuildCancelled,
    BuildCompleted,
    BuildContinued,
    BuildFailed,
    BuildRejected,
    BuildRequested,
    BuildResumed,
    BuildSleeping,
    Envelope,
    IterationCompleted,
    PreviewAvailable,
    PreviewGone,
    ProcessExited,
    ProcessStarted,
    SnapshotSaved,
    TopUpRequested,
)
from kiln_runtime.errors import RetryLater

from . import model, waiting
from .model import Projection
from .ports import BuildStore
from .previews import previews_after

MAX_PROCESSES = 50


def processes_after(processes: str, event: ProcessStarted | ProcessExited) -> str:
    """The projection's JSON list of processes after a process event (in any order: an exit
    that comes first is kept, and the start fills in the rest)."""
    listed: list[dict[str, object]] = json.loads(processes or "[]")
    entry = next((p for p in listed if p.get("process_id") == event.process_id), None)
    if entry is None:
        entry = {"process_id": event.process_id, "status": "running"}
        listed.append(entry)
    if isinstance(event, ProcessStarted):
        entry.update(command=event.command, pid=event.pid, sandbox_id=event.sandbox_id)
        entry.setdefault("status", "running")
    else:
        entry.update(status=event.how, exit_code=event.exit_code, reason=event.reason)
    return json.dumps(listed[-MAX_PROCESSES:])


def evolve(state: Projection, event: Envelope, seq: int) -> Projection:
    """The build's projected state after ``event`` (stream sequence ``seq``). Terminal states
    stick until the build continues (``BuildContinued``: running again, once per continuation);
    a snapshot still counts after the end (the final one is taken after it)."""
    new = replace(
        state, last_seq=max(state.last_seq, seq), waiting=waiting.after(state.waiting, event)
    )
    if isinstance(event, SnapshotSaved):
        return replace(new, last_snapshot_id=event.snapshot_id)
    if isinstance(event, ProcessStarted | ProcessExited):  # after the end too: stopped then
        return replace(new, processes=processes_after(state.processes, event))
    if isinstance(event, PreviewAvailable | PreviewGone):  # gone after the end too
        return replace(new, previews=previews_after(state.previews, event, seq))
    if isinstance(event, BuildContinued):
        if event.continuation <= state.continuations:
            return new  # a repeat
        return replace(
            new,
            status=model.RUNNING,
            continuations=event.continuation,
            iteration=max(state.iteration, event.iterations),
            cost_micro_usd=max(state.cost_micro_usd, event.cost_micro_usd),
            summary=None,
            reason=None,
            terminal_seq=None,
            finished_at=None,
        )
    if isinstance(event, BuildCompleted | BuildFailed | BuildCancelled) and (
        event.continuation < state.continuations
    ):
        return new  # the end of a run the build has continued from
    if state.terminal:
        return new
    if isinstance(event, BuildRequested):
        if state.status == model.QUEUED:
            new = replace(new, status=model.RUNNING)
        if event.fork is not None:  # a fork starts at its source's iteration
            new = replace(new, iteration=max(new.iteration, event.fork.iteration))
    elif isinstance(event, IterationCompleted):
        new = replace(
            new,
            iteration=max(state.iteration, event.iteration),
            cost_micro_usd=state.cost_micro_usd + event.cost_micro_usd,
        )
    elif isinstance(event, BuildSleeping):
        new = replace(new, status=model.SLEEPING, reason=event.reason)
    elif isinstance(event, BuildResumed):
        if state.status in (model.SLEEPING, model.QUEUED):
            new = replace(new, status=model.RUNNING, reason=None)
    elif isinstance(event, BuildCompleted | BuildFailed | BuildCancelled):
        status = {
            BuildCompleted.kind: model.COMPLETED,
            BuildFailed.kind: model.FAILED,
            BuildCancelled.kind: model.CANCELLED,
        }[event.kind]
        if isinstance(event, BuildCompleted):
            summary, reason = event.summary, None
        elif isinstance(event, BuildFailed):
            summary = None
            reason = f"{event.reason}: {event.detail}" if event.detail else event.reason
        else:
            summary, reason = None, event.reason
        new = replace(
            new,
            status=status,
            iteration=max(state.iteration, event.iterations),
            cost_micro_usd=max(state.cost_micro_usd, event.cost_micro_usd),
            summary=summary,
            reason=reason,
            terminal_seq=seq,
            finished_at=event.occurred_at,
        )
    elif isinstance(event, BuildRejected):
        new = replace(
            new,
            status=model.REJECTED,
            reason=event.reason,
            terminal_seq=seq,
            finished_at=event.occurred_at,
        )
    return new


async def project(store: BuildStore, event: Envelope, seq: int, num_delivered: int = 1) -> str:
    """Apply one event of the stream to the builds read model; idempotent by stream sequence."""
    if isinstance(event, TopUpRequested):
        return "not a build"  # a command to the budget, on the user's budget subject
    if isinstance(event, BuildRequested):
        await store.insert_from_event(event)
    outcome = await store.update_projection(event.build_id, seq, lambda s: evolve(s, event, seq))
    if outcome == "missing" and num_delivered < 3:
        # The build's BuildRequested may still be on its way back (redelivered); wait for it.
        raise RetryLater(f"unknown build {event.build_id}", delay_s=2.0)
    return outcome
