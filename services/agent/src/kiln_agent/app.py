"""Subscribers: validate (the bus does) and delegate to the loop; nothing else."""

from __future__ import annotations

from kiln_contracts import (
    BuildRequested,
    CancelRequested,
    SendUserMessage,
    SleepRequested,
    ToolResult,
    WakeRequested,
)
from kiln_runtime.bus import Bus, Delivery

from .loop import Agent

SERVICE = "agent"


def register(bus: Bus, agent: Agent, *, workers: int = 128) -> None:
    async def on_build_requested(msg: BuildRequested, delivery: Delivery) -> None:
        """Start a build, or a fork of another (a repeat of the same build id is a no-op)."""
        await agent.build_requested(msg, delivery.num_delivered)

    async def on_tool_result(msg: ToolResult, _: Delivery) -> None:
        """Record a tool result; think the next iteration when the set is complete."""
        await agent.tool_result(msg)

    async def on_cancel(msg: CancelRequested, _: Delivery) -> None:
        """Cancel a build; later results are ignored."""
        await agent.cancel(msg)

    async def on_sleep(msg: SleepRequested, _: Delivery) -> None:
        """Put a build to sleep once no call is in flight."""
        await agent.sleep(msg)

    async def on_wake(msg: WakeRequested, _: Delivery) -> None:
        """Resume a sleeping build."""
        await agent.wake(msg)

    async def on_user_message(msg: SendUserMessage, delivery: Delivery) -> None:
        """Take a user's message: read at the next think, or it continues an ended build."""
        await agent.user_message(msg, delivery.num_delivered)

    # as many workers for what stops or steers a build as for what moves it: handlers share the
    # process, so with fewer a burst of results would hold a budget's sleeps (or a cancel) back
    # while the builds they are for go on iterating
    bus.consume(BuildRequested, on_build_requested, max_workers=workers)
    bus.consume(ToolResult, on_tool_result, max_workers=workers)
    bus.consume(CancelRequested, on_cancel, max_workers=workers)
    bus.consume(SleepRequested, on_sleep, max_workers=workers)
    bus.consume(WakeRequested, on_wake, max_workers=workers)
    bus.consume(SendUserMessage, on_user_message, max_workers=workers)
