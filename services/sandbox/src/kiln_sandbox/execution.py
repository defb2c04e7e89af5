"""Running one tool call in a sandbox: the call's deadline, its result (with the stable event id
every replica gives it), and the audit line written just before it runs."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from kiln_contracts import ToolCall, ToolResult, stable_id

from .ports import SandboxGone
from .tools import ToolContext, run_tool
from .workspace import Workspace

# Extra time a whole call may take beyond its command timeout (stat scans, file reads ...).
CALL_MARGIN_S = 30.0
# A ToolResult must stay well under the stream's message size limit.
MAX_FILES_CHANGED = 500


def tool_result(call: ToolCall, **fields: Any) -> ToolResult:
    """The call's result; the same event id whichever replica makes it, however often."""
    return call.caused(
        ToolResult, call_id=call.call_id, iteration=call.iteration, **fields
    ).with_id(stable_id(call.build_id, "tool_result", call.call_id))


async def execute(sandbox: Workspace, call: ToolCall, ctx: ToolContext) -> ToolResult:
    """Run the call's tool within its timeout (plus ``CALL_MARGIN_S``); a timeout or a sandbox
    that went away is an error result, not an exception."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(call.timeout_s + CALL_MARGIN_S):
            outcome = await run_tool(
                sandbox, call.tool, dict(call.input), timeout_s=call.timeout_s, ctx=ctx
            )
    except TimeoutError:
        return tool_result(
            call,
            output=f"{call.tool} did not finish within {call.timeout_s + CALL_MARGIN_S:g}s",
            is_error=True,
            duration_ms=int((time.monotonic() - started) * 1000),
        )
    except SandboxGone as err:
        # The registry still says 'running': the next call finds it gone and replaces it.
        return tool_result(
            call,
            output=f"the sandbox went away while running this call ({err}); "
            "a fresh one is used for the next call",
            is_error=True,
            duration_ms=int((time.monotonic() - started) * 1000),
        )
    return tool_result(
        call,
        output=outcome.output,
        is_error=outcome.is_error,
        exit_code=outcome.exit_code,
        duration_ms=int((time.monotonic() - started) * 1000),
        files_changed=outcome.files_changed[:MAX_FILES_CHANGED],
    )


def log_execution(exec_log: Path | None, call: ToolCall, owner: str) -> None:
    """An audit trail: one line per execution in ``exec_log`` (if any), appended just before a
    tool runs."""
    if exec_log is None:
        return
    line = json.dumps(
        {"build_id": call.build_id, "call_id": call.call_id, "tool": call.tool,
         "owner": owner, "at": time.time()}
    )  # fmt: skip
    with exec_log.open("a") as out:  # one short line: an atomic append
        out.write(line + "\n")
