"""What a build is waiting on, from its events as they are projected: the service that has to
act next, on what, since when. A running build waits on the sandbox while calls it asked for
have no result (the calls named), else on the agent (its model call); a sleeping one on the
budget (the reset, or a top-up); a completed one on the snapshot service until its final
snapshot is stored (the files of its end are not downloadable before). It is kept in the row as JSON text
(``Projection.waiting``): ``{"service", "what", "since", "calls"}``, or ``{}`` for nothing."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

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
    SnapshotSaved,
    ToolCall,
    ToolResult,
)

NOTHING = "{}"
MAX_CALLS = 20  # named in the row; a turn rarely has more


def after(current: str, event: Envelope) -> str:
    """The waiting after ``event`` (``current``: before it)."""
    state: dict[str, Any] = json.loads(current or NOTHING)
    at = event.occurred_at
    if isinstance(event, BuildRequested | BuildContinued | BuildResumed):
        return _dump("agent", "the model", at)
    if isinstance(event, ToolCall):
        calls = state.get("calls", []) if state.get("service") == "sandbox" else []
        if event.call_id not in {c["call_id"] for c in calls}:
            calls = [*calls, {"call_id": event.call_id, "tool": event.tool}][-MAX_CALLS:]
        since = state.get("since") if state.get("service") == "sandbox" else at.isoformat()
        return _dump("sandbox", _calls(calls), since, calls)
    if isinstance(event, ToolResult):
        if state.get("service") != "sandbox":
            return current
        calls = [c for c in state.get("calls", []) if c["call_id"] != event.call_id]
        if calls:
            return _dump("sandbox", _calls(calls), state.get("since"), calls)
        return _dump("agent", "the model", at)
    if isinstance(event, BuildSleeping):
        until = f" (wakes at {event.wake_at.isoformat()})" if event.wake_at else ""
        return _dump("budget", f"the allowance{until}", at)
    if isinstance(event, BuildCompleted):
        return NOTHING if state.get("final_saved") else _dump("snapshot", "the final snapshot", at)
    if isinstance(event, BuildFailed | BuildCancelled | BuildRejected):
        return NOTHING  # no final snapshot is taken
    if isinstance(event, SnapshotSaved) and event.reason == "final":
        if state.get("service") == "snapshot":
            return NOTHING
        # stored before the BuildCompleted that asked for it reached the stream
        return json.dumps({**state, "final_saved": True}) if state else current
    return current


def of(waiting: str, now: datetime) -> dict[str, Any] | None:
    """For the API: the service, what, since, and how many seconds that is; None: nothing."""
    state: dict[str, Any] = json.loads(waiting or NOTHING)
    if not state:
        return None
    since = datetime.fromisoformat(state["since"])
    return {
        "service": state["service"],
        "what": state["what"],
        "since": since,
        "seconds": max(0.0, round((now - since).total_seconds(), 1)),
    }


def _calls(calls: list[dict[str, str]]) -> str:
    named = ", ".join(f"{c['tool']} ({c['call_id']})" for c in calls[:3])
    more = f" and {len(calls) - 3} more" if len(calls) > 3 else ""
    return f"tool call{'s' if len(calls) > 1 else ''} {named}{more}"


def _dump(
    service: str, what: str, since: datetime | str | None, calls: list[Any] | None = None
) -> str:
    stamp = since.isoformat() if isinstance(since, datetime) else since
    state: dict[str, Any] = {"service": service, "what": what, "since": stamp}
    if calls:
        state["calls"] = calls
    return json.dumps(state)
