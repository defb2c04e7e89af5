"""Who consumes and who publishes each message: the bus's topology, as data.

The AsyncAPI document (contracts/schemas/asyncapi.json) is generated from this table, and a test
checks that each service's subscribers are exactly the kinds listed here.
"""

from __future__ import annotations

from typing import Final

from .messages import (
    MESSAGES,
    AgentNarrated,
    BuildCancelled,
    BuildCompleted,
    BuildContinued,
    BuildFailed,
    BuildRejected,
    BuildRequested,
    BuildResumed,
    BuildSleeping,
    CancelRequested,
    CheckpointSaved,
    Envelope,
    IterationCompleted,
    ProcessExited,
    ProcessStarted,
    SandboxRestored,
    SandboxStarted,
    SandboxStopped,
    SendUserMessage,
    SleepRequested,
    SnapshotSaved,
    ToolCall,
    ToolResult,
    TopUpRequested,
    WakeRequested,
)
from .webhooks import EVENT_TYPES

Kinds = tuple[type[Envelope], ...]

CONSUMES: Final[dict[str, Kinds]] = {
    # The gateway projects every build event onto its read model (and replays them over SSE); it
    # receives a user's top-ups too, and leaves them to the budget.
    "gateway": MESSAGES,
    "agent": (
        BuildRequested,
        ToolResult,
        CancelRequested,
        SleepRequested,
        WakeRequested,
        SendUserMessage,
    ),
    "sandbox": (ToolCall, SnapshotSaved, BuildCancelled, BuildFailed),
    "budget": (
        IterationCompleted,
        BuildRequested,
        BuildResumed,
        BuildContinued,
        BuildCompleted,
        BuildFailed,
        BuildCancelled,
        BuildRejected,
        TopUpRequested,
    ),
    # BuildRequested: a fork's first snapshot is a copy of its source's
    "snapshot": (CheckpointSaved, BuildRequested),
    # The webhooks service reads the kinds endpoints can ask for (kiln_contracts.webhooks.
    # EVENT_TYPES) with one consumer, in stream order.
    "webhooks": tuple(EVENT_TYPES.values()),
}

PUBLISHES: Final[dict[str, Kinds]] = {
    "gateway": (
        BuildRequested,
        CancelRequested,
        WakeRequested,
        TopUpRequested,
        SendUserMessage,
    ),
    "agent": (
        ToolCall,
        IterationCompleted,
        CheckpointSaved,
        AgentNarrated,
        BuildSleeping,
        BuildResumed,
        BuildContinued,
        BuildCompleted,
        BuildFailed,
        BuildCancelled,
        BuildRejected,
    ),
    "sandbox": (
        ToolResult,
        SandboxStarted,
        SandboxRestored,
        SandboxStopped,
        ProcessStarted,
        ProcessExited,
    ),
    "budget": (SleepRequested, WakeRequested),
    "snapshot": (SnapshotSaved,),
    "webhooks": (),  # it sends HTTP requests outward, nothing on the bus
}
