"""A build's history as Server-Sent Events: what the stream holds after a sequence, then live."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

from kiln_contracts import TERMINAL_KINDS

from .model import Build
from .ports import EventSource, StoredEvent

HEARTBEAT = ": heartbeat\n\n"
RETRY = "retry: 2000\n\n"


def sse_frame(ev: StoredEvent) -> str:
    """One Server-Sent Event: ``id`` = stream sequence, ``event`` = kind, ``data`` = the message."""
    text = ev.data.decode("utf-8", errors="replace")
    lines = [f"id: {ev.seq}", f"event: {ev.kind}"]
    lines += [f"data: {line}" for line in (text.splitlines() or [""])]
    return "\n".join(lines) + "\n\n"


async def event_stream(
    events: EventSource, build: Build, after_seq: int, idle_s: float
) -> AsyncIterator[str]:
    """The build's history after ``after_seq`` then live events as SSE text, ending after the
    end of its current run (as the read model knows it when the stream starts: the ends of the
    runs it continued from pass by); a heartbeat comment after ``idle_s`` of quiet."""
    terminal_seq = build.state.terminal_seq
    if terminal_seq is not None and after_seq >= terminal_seq:
        return  # the client has already seen the end
    yield RETRY
    async with contextlib.aclosing(events.history(build.build_id, after_seq, idle_s)) as history:
        async for ev in history:
            if ev is None:
                yield HEARTBEAT
                continue
            yield sse_frame(ev)
            if ev.kind in TERMINAL_KINDS and _run_of(ev) >= build.state.continuations:
                return


def _run_of(ev: StoredEvent) -> int:
    """The run a terminal event ends (its ``continuation``; 0 when absent or unreadable)."""
    try:
        run = json.loads(ev.data).get("continuation", 0)
    except (ValueError, AttributeError):
        return 0
    return run if isinstance(run, int) else 0
