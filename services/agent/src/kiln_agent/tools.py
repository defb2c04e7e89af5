"""The tools the model may call: the nine sandbox tools and ``narrate`` (handled by the agent),
and the check of a call's input against its tool's schema."""

from __future__ import annotations

from functools import cache
from typing import Any, get_args

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

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
            "Read a text file. Output is numbered like `cat -n` (line number, tab, text), from "
            "line 1 unless offset is given; at most 2,000 lines by default (limit) and 30,000 "
            "characters; lines longer than 2,000 characters are cut. What was cut is said at "
            "the end. Read a file before editing it.",
            {
                "path": _PATH,
                "offset": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "The line number to start reading from (1-based).",
                },
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "The number of lines to read (default 2,000).",
                },
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
            "Replace an exact string in a file. The file must have been read with read_file "
            "(or written by you) since it last changed, else the edit is refused. old_string "
            "must occur exactly once unless replace_all is true; keep its indentation exactly "
            "as read_file shows it (after the line number and tab).",
            {
                "path": _PATH,
                "old_string": {"type": "string", "description": "The text to replace."},
                "new_string": {"type": "string", "description": "The text to put instead."},
                "replace_all": {
                    "type": "boolean",
                    "default": False,
                    "description": "Replace every occurrence of old_string (default false).",
                },
            },
            ["path", "old_string", "new_string"],
        ),
        _tool(
            "bash",
            "Run a shell command in the workspace root. Output (stdout and stderr) is cut to "
            "its first and last 15,000 characters, with what was cut said. With "
            "run_in_background the command is started in the background and the call returns "
            "at once with its id (bash_1, ...): read its output with bash_output, stop it with "
            "kill_shell. Use it for servers and watchers; background processes are stopped "
            "when the build sleeps or ends, and are not restarted.",
            {
                "command": {"type": "string", "description": "The command to run."},
                "description": {
                    "type": "string",
                    "description": "What the command does, in 5-10 words.",
                },
                "timeout": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": 3_600_000,
                    "description": "Timeout in milliseconds (capped by the build's tool timeout).",
                },
                "timeout_s": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": 3600,
                    "description": "Timeout in seconds (instead of timeout).",
                },
                "run_in_background": {
                    "type": "boolean",
                    "description": "Start the command in the background and return at once.",
                },
            },
            ["command"],
        ),
        _tool(
            "bash_output",
            "Read the output a background process (started by bash with run_in_background) "
            "has written since the last read, and whether it is still running or its exit "
            "code. At most 30,000 characters per call (the rest on the next call).",
            {
                "bash_id": {"type": "string", "description": "The process's id, e.g. bash_1."},
                "filter": {
                    "type": "string",
                    "description": "A regular expression: only the new lines that match are "
                    "shown; the others are skipped for good.",
                },
            },
            ["bash_id"],
        ),
        _tool(
            "kill_shell",
            "Stop a background process (SIGTERM, then SIGKILL after 3 seconds) and everything "
            "it started.",
            {"shell_id": {"type": "string", "description": "The process's id, e.g. bash_1."}},
            ["shell_id"],
        ),
        _tool(
            "glob",
            "Find files by glob pattern (`**/*.py`, `src/**/*.{ts,tsx}`), newest first; at "
            "most 1,000 paths. .git, node_modules, .venv and caches are not searched.",
            {
                "pattern": {"type": "string", "description": "The glob to match paths with."},
                "path": {
                    **_PATH,
                    "description": "The directory to search in (default: the workspace).",
                },
            },
            ["pattern"],
        ),
        _tool(
            "grep",
            "Search file contents with a regular expression (PCRE, one grep over the tree). "
            "output_mode: files_with_matches (default: the paths), content (path:line:text, "
            "with -A/-B/-C context), count (path:count). At most head_limit lines or files "
            "(default 500); binary files, .git, node_modules, .venv and caches are skipped.",
            {
                "pattern": {"type": "string", "description": "A regular expression."},
                "path": {**_PATH, "description": "A file or directory to search (default: all)."},
                "glob": {
                    "type": "string",
                    "description": "Only files matching this glob (`*.js`, `*.{ts,tsx}`, "
                    "`src/**/*.py`).",
                },
                "type": {
                    "type": "string",
                    "description": "Only files of this type: py, js, ts, html, css, json, md, "
                    "yaml, toml, sh, go, rust, java, c, cpp, rb, php, sql, txt.",
                },
                "output_mode": {
                    "type": "string",
                    "enum": ["content", "files_with_matches", "count"],
                    "description": "What to show (default files_with_matches).",
                },
                "-i": {"type": "boolean", "description": "Case-insensitive search."},
                "-n": {
                    "type": "boolean",
                    "description": "Line numbers in content mode (default true).",
                },
                "-A": {"type": "integer", "minimum": 0, "description": "Lines after a match."},
                "-B": {"type": "integer", "minimum": 0, "description": "Lines before a match."},
                "-C": {"type": "integer", "minimum": 0, "description": "Lines around a match."},
                "head_limit": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "Show at most this many lines (content) or files (default 500).",
                },
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


@cache
def _validators() -> dict[str, Draft202012Validator]:
    return {t["name"]: Draft202012Validator(t["input_schema"]) for t in definitions("")}


def input_error(tool: str, value: object) -> str | None:
    """Why ``value`` is not a valid input for ``tool`` (each offending field named), or None if it
    is valid or the tool is not one of ours."""
    validator = _validators().get(tool)
    if validator is None:
        return None
    errors = sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.path])
    if not errors:
        return None
    problems = "; ".join(_describe(e) for e in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return f"invalid input for {tool}: {problems}{more}. Fix the input and call {tool} again."


def _describe(err: ValidationError) -> str:
    field = ".".join(str(p) for p in err.path)
    where = f'field "{field}"' if field else "the input"
    kind, expected, got = err.validator, err.validator_value, err.instance
    if kind == "required" and isinstance(got, dict):
        missing = [name for name in expected if name not in got]
        return ", ".join(f'missing required field "{name}"' for name in missing)
    if kind == "additionalProperties" and isinstance(got, dict):
        allowed = set(err.schema.get("properties", {}))
        extra = sorted(name for name in got if name not in allowed)
        fields = ", ".join(f'"{name}"' for name in extra)
        noun = "field" if len(extra) == 1 else "fields"
        return f"unknown {noun} {fields} (allowed: {', '.join(sorted(allowed)) or 'none'})"
    if kind == "type":
        return f"{where} must be of type {expected}, not {_json_type(got)}"
    if kind in ("maxLength", "minLength") and isinstance(got, str):
        bound = "at most" if kind == "maxLength" else "at least"
        return f"{where} must be {bound} {expected} characters long, not {len(got)}"
    message = err.message if len(err.message) <= 200 else err.message[:200] + "..."
    return f"{where}: {message}"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
