"""The tools the model calls, Claude-Code style, on a build's ``Workspace``.

Every tool takes the call's ``input`` dict and returns a ``ToolOutcome``; bad input and tool
failures become ``is_error`` outcomes with a clear message, never exceptions (only a vanished
sandbox, ``SandboxGone``, escapes, so the service can replace it). Paths are relative to the
workspace; '..', absolute paths outside it and symlinks leading outside are refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..ports import PathOutsideWorkspace, SandboxError
from ..workspace import Workspace
from .base import MAX_OUTPUT_CHARS, BadInput, ToolContext, ToolOutcome, error
from .files import edit_file, read_file, write_file
from .grep import grep
from .search import glob, glob_to_regex, list_dir
from .shell import bash, bash_output, kill_shell

__all__ = ["MAX_OUTPUT_CHARS", "TOOLS", "ToolContext", "ToolOutcome", "glob_to_regex", "run_tool"]

Tool = Callable[[Workspace, dict[str, Any], ToolContext], Awaitable[ToolOutcome]]


async def run_tool(
    ws: Workspace, tool: str, args: dict[str, Any], *, timeout_s: float, ctx: ToolContext
) -> ToolOutcome:
    """Run one tool; every failure but a vanished sandbox becomes an is_error outcome."""
    try:
        if not isinstance(args, dict):
            raise BadInput("input must be an object")
        if tool == "bash":
            return await bash(ws, args, ctx, default_timeout_s=timeout_s)
        fn = TOOLS.get(tool)
        if fn is None:
            return error(f"unknown tool {tool!r}; available: {', '.join([*TOOLS, 'bash'])}")
        return await fn(ws, args, ctx)
    except BadInput as err:
        return error(f"invalid input for {tool}: {err}")
    except PathOutsideWorkspace as err:
        return error(f"refused: {err}")
    except SandboxError as err:
        return error(str(err))


TOOLS: dict[str, Tool] = {
    "read_file": read_file,
    "write_file": write_file,
    "edit_file": edit_file,
    "glob": glob,
    "grep": grep,
    "list_dir": list_dir,
    "bash_output": bash_output,
    "kill_shell": kill_shell,
}
