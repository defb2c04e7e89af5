"""The tools the model may call: the seven sandbox tools and ``narrate`` (handled by the agent)."""

from __future__ import annotations

from typing import Any, get_args

from kiln_contracts.messages import ToolName

NARRATE = "narrate"
SANDBOX_TOOLS: frozenset[str] = frozenset(get_args(ToolName))

_PATH = {"type": "string", "description": "A path relative to the workspace root."}


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict:
    return {
        "name": name,
        "description": description,
        "input_schema": {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
        },
    }


def definitions(narrate_description: str) -> list[dict[str, Any]]:
    """The tool definitions sent with every Messages call (a stable order: cacheable)."""
    return [
        _tool(
            "read_file",
            "Read a text file. Lines are numbered from 1; offset/limit select a range of lines.",
            {
                "path": _PATH,
                "offset": {"type": "integer", "minimum": 1, "description": "First line (1-based)."},
                "limit": {"type": "integer", "minimum": 1, "description": "How many lines."},
            },
            ["path"],
        ),
        _tool(
            "write_file",
            "Create or overwrite a file with the given content; parent directories are created.",
            {"path": _PATH, "content": {"type": "string"}},
            ["path", "content"],
        ),
        _tool(
            "edit_file",
            "Replace an exact string in a file. old_string must occur exactly once unless "
            "replace_all is true.",
            {
                "path": _PATH,
                "old_string": {"type": "string"},
                "new_string": {"type": "string"},
                "replace_all": {"type": "boolean", "default": False},
            },
            ["path", "old_string", "new_string"],
        ),
        _tool(
            "bash",
            "Run a shell command in the workspace root. Output (stdout and stderr) is truncated.",
            {
                "command": {"type": "string"},
                "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
            },
            ["command"],
        ),
        _tool(
            "glob",
            "List files matching a glob pattern (e.g. `**/*.py`), relative to the workspace.",
            {"pattern": {"type": "string"}},
            ["pattern"],
        ),
        _tool(
            "grep",
            "Search file contents with a regular expression; prints path:line:text matches.",
            {
                "pattern": {"type": "string", "description": "A regular expression."},
                "path": {**_PATH, "description": "A file or directory to search (default: all)."},
                "glob": {"type": "string", "description": "Only files matching this glob."},
            },
            ["pattern"],
        ),
        _tool(
            "list_dir",
            "List a directory's entries (directories end with /).",
            {"path": {**_PATH, "default": "."}},
            [],
        ),
        _tool(
            NARRATE,
            narrate_description,
            {"text": {"type": "string", "maxLength": 20000}},
            ["text"],
        ),
    ]
