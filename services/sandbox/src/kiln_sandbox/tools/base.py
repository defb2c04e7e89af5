"""What every tool shares: its outcome, its limits, reading its arguments, normalising a path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln_contracts import ToolCall

from ..records import ReadLog
from ..workspace import Workspace

if TYPE_CHECKING:
    from ..processes import Processes

MAX_OUTPUT_CHARS = 30_000
MAX_READ_BYTES = 5 * 1024 * 1024
DEFAULT_READ_LINES = 2_000
MAX_LINE_CHARS = 2_000
MAX_GLOB_RESULTS = 1_000
MAX_GREP_MATCHES = 500  # grep's default head_limit (lines, files or counts)
MAX_GREP_RAW_BYTES = 1024 * 1024  # of grep's own output, fetched from the sandbox at most
MAX_LIST_ENTRIES = 1_000
MAX_SCAN_ENTRIES = 20_000
SCAN_SKIP_DIRS = frozenset(
    {".git", "__pycache__", "node_modules", ".venv", ".cache", ".mypy_cache", ".pytest_cache"}
)


@dataclass(frozen=True)
class ToolOutcome:
    output: str
    is_error: bool = False
    exit_code: int | None = None
    files_changed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ToolContext:
    """What a tool knows beyond its input: the call, the build's read log (edit_file's
    read-before-edit check) and its background processes."""

    call: ToolCall
    reads: ReadLog
    processes: Processes

    @property
    def build_id(self) -> str:
        return self.call.build_id


class BadInput(Exception):
    pass


def error(text: str) -> ToolOutcome:
    return ToolOutcome(output=text, is_error=True)


def normalize(ws: Workspace, path: Any, *, allow_root: bool = True) -> str:
    """A workspace-relative, '/'-separated path; PathOutsideWorkspace if it leaves the workspace."""
    if not isinstance(path, str):
        raise BadInput("path must be a string")
    rel = ws.relative(path)
    if not rel and not allow_root:
        raise BadInput("path must name a file")
    return rel


def truncate(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    cut = len(text) - 2 * half
    return f"{text[:half]}\n\n[... {cut} characters truncated ...]\n\n{text[-half:]}"


def arg(args: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in args or args[name] is None:
        if default is ...:
            raise BadInput(f"missing required argument {name!r}")
        return default
    value = args[name]
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) and kind is not bool:
        raise BadInput(f"argument {name!r} must be {_kind_name(kind)}")
    if not isinstance(value, kind):
        raise BadInput(f"argument {name!r} must be {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def looks_binary(data: bytes) -> bool:
    return b"\x00" in data[:8192]
