"""The repetition guard: the same tool call (tool and input) made ``limit`` times in a row ends the
build (a model stuck in a loop spends money and gets nowhere). Polling a background process's
output (``bash_output``) is not repetition: the same call gives new output each time; it neither
counts nor breaks a streak (the iteration and cost limits still bound it)."""

from __future__ import annotations

import json

from .checkpoint import PendingCall, State

POLLING = frozenset({"bash_output"})
_SORTED = json.JSONEncoder(sort_keys=True)  # one encoder (json.dumps makes one a call)


def count(state: State, call: PendingCall, limit: int) -> str | None:
    """Count ``call`` in the streak kept in ``state``; the reason to stop if it reached ``limit``."""
    if call.tool in POLLING:
        return None
    signature = f"{call.tool}:{_SORTED.encode(call.input)}"
    if signature == state.streak_call:
        state.streak += 1
    else:
        state.streak_call, state.streak = signature, 1
    if state.streak >= limit:
        return f"{state.streak} identical calls: {signature[:500]}"
    return None
