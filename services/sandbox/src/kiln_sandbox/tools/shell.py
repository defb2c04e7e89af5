"""The shell tools: ``bash`` (a command in the workspace and the files it changed, or a command
started in the background), ``bash_output`` and ``kill_shell`` (``processes.py``)."""

from __future__ import annotations

import re
from typing import Any

from ..workspace import Workspace
from .base import (
    MAX_OUTPUT_CHARS,
    MAX_SCAN_ENTRIES,
    SCAN_SKIP_DIRS,
    BadInput,
    ToolContext,
    ToolOutcome,
    arg,
    truncate,
)


async def _snapshot_stats(ws: Workspace) -> dict[str, tuple[int, int]]:
    entries = await ws.list_entries("", depth=64, skip_dirs=SCAN_SKIP_DIRS, limit=MAX_SCAN_ENTRIES)
    return {e.path: (e.mtime_ns, e.size) for e in entries if not e.is_dir}


async def bash(
    ws: Workspace, args: dict[str, Any], ctx: ToolContext, *, default_timeout_s: float
) -> ToolOutcome:
    command = arg(args, "command", str)
    if not command.strip():
        raise BadInput("command must not be empty")
    arg(args, "description", str, "")  # shown to people, not run
    if arg(args, "run_in_background", bool, False):
        record = await ctx.processes.start(ws, ctx.call, command)
        return ToolOutcome(
            output=f"Command running in background with ID: {record.process_id}"
            + (f" (pid {record.pid})" if record.pid else "")
            + f". Read its output with bash_output(bash_id={record.process_id!r}); stop it "
            f"with kill_shell(shell_id={record.process_id!r}). It runs until it exits, is "
            "stopped, or the build sleeps or ends."
        )
    timeout_ms = arg(args, "timeout", (int, float), None)  # Claude Code's, in milliseconds
    if timeout_ms is not None and timeout_ms <= 0:
        raise BadInput("timeout must be > 0 (milliseconds)")
    fallback = timeout_ms / 1000 if timeout_ms is not None else default_timeout_s
    timeout_s = float(arg(args, "timeout_s", (int, float), fallback))
    if timeout_s <= 0:
        raise BadInput("timeout_s must be > 0")
    timeout_s = min(timeout_s, default_timeout_s)
    before = await _snapshot_stats(ws)
    result = await ws.run(command, timeout_s=timeout_s, max_output=MAX_OUTPUT_CHARS)
    after = await _snapshot_stats(ws)
    changed = sorted(p for p, s in after.items() if before.get(p) != s)
    head = result.head.decode("utf-8", errors="replace")
    tail = result.tail.decode("utf-8", errors="replace")
    omitted = result.total_bytes - len(result.head) - len(result.tail)
    if omitted > 0:
        output = (
            f"{head}\n\n[... {omitted:,} bytes of output truncated "
            f"({result.total_bytes:,} bytes in all) ...]\n\n{tail}"
        )
    else:
        output = head + tail
    if result.timed_out:
        output += f"\n[command timed out after {timeout_s:g}s; its process group was killed]"
        return ToolOutcome(output=output, is_error=True, exit_code=None, files_changed=changed)
    if not output:
        output = "(no output)"
    if result.exit_code:
        output += f"\n[exit code {result.exit_code}]"
    return ToolOutcome(
        output=output,
        is_error=False,
        exit_code=result.exit_code,
        files_changed=changed,
    )


async def bash_output(ws: Workspace, args: dict[str, Any], ctx: ToolContext) -> ToolOutcome:
    process_id = arg(args, "bash_id", str)
    pattern = arg(args, "filter", str, None)
    try:
        regex = re.compile(pattern) if pattern else None
    except re.error as err:
        raise BadInput(f"invalid filter regular expression: {err}") from err
    return ToolOutcome(output=truncate(await ctx.processes.output(ws, ctx.call, process_id, regex)))


async def kill_shell(ws: Workspace, args: dict[str, Any], ctx: ToolContext) -> ToolOutcome:
    process_id = arg(args, "shell_id", str)
    return ToolOutcome(output=await ctx.processes.kill(ws, ctx.call, process_id))
