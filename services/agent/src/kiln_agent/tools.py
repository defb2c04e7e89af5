"""The tools the model may call: the seven sandbox tools and ``narrate`` (handled by the agent),
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
