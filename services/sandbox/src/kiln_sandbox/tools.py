"""The tools the model calls, Claude-Code style, on a build's ``Workspace``.

Every tool takes the call's ``input`` dict and returns a ``ToolOutcome``; bad input and tool
failures become ``is_error`` outcomes with a clear message, never exceptions (only a vanished
sandbox, ``SandboxGone``, escapes, so the service can replace it). Paths are relative to the
workspace; '..', absolute paths outside it and symlinks leading outside are refused.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .ports import FileInfo, Located, PathOutsideWorkspace, SandboxError
from .workspace import Workspace

MAX_OUTPUT_CHARS = 30_000
MAX_READ_BYTES = 5 * 1024 * 1024
DEFAULT_READ_LINES = 2_000
MAX_LINE_CHARS = 2_000
MAX_GLOB_RESULTS = 1_000
MAX_GREP_MATCHES = 500
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


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob ('**' crosses directories, '*' and '?' do not) to an anchored regex."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        elif c == "{":
            end = pattern.find("}", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                alts = pattern[i + 1 : end].split(",")
                out.append("(?:" + "|".join(re.escape(a) for a in alts) + ")")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


# ---------------------------------------------------------------------------- the tools


async def read_file(ws: Workspace, args: dict[str, Any]) -> ToolOutcome:
    path = normalize(ws, arg(args, "path", str), allow_root=False)
    offset = arg(args, "offset", int, 1)
    limit = arg(args, "limit", int, DEFAULT_READ_LINES)
    if offset < 1:
        offset = 1 if offset == 0 else offset
        if offset < 0:
            raise BadInput("offset is a 1-based line number and must be >= 1")
    if limit < 1:
        raise BadInput("limit must be >= 1")
    found = await ws.locate(path)
    info = found.info
    if info is None:
        return error(f"file not found: {path}")
    if info.is_dir:
        return error(f"{path} is a directory; use list_dir")
    if info.size > MAX_READ_BYTES:
        return error(
            f"{path} is {info.size:,} bytes, larger than the {MAX_READ_BYTES // (1024 * 1024)} MB "
            "read limit; use bash (e.g. head, sed -n, grep) to look at parts of it"
        )
    data = await ws.read(found)
    if looks_binary(data):
        return error(f"{path} looks like a binary file ({len(data):,} bytes); not shown")
    text = data.decode("utf-8", errors="replace")
    if not text:
        return ToolOutcome(output=f"(file {path} is empty)")
    lines = text.splitlines()
    if offset > len(lines):
        return error(f"offset {offset} is past the end of {path} ({len(lines)} lines)")
    chosen = lines[offset - 1 : offset - 1 + limit]
    body = "\n".join(
        f"{n:>4}\t{line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + ' [line truncated]'}"
        for n, line in enumerate(chosen, start=offset)
    )
    last = offset - 1 + len(chosen)
    if last < len(lines):
        body += f"\n[showing lines {offset}-{last} of {len(lines)}; pass offset to read more]"
    return ToolOutcome(output=truncate(body))


async def write_file(ws: Workspace, args: dict[str, Any]) -> ToolOutcome:
    path = normalize(ws, arg(args, "path", str), allow_root=False)
    content = arg(args, "content", str)
    found = await ws.locate(path)
    existing = found.info
    if existing is not None and existing.is_dir:
        return error(f"{path} is a directory")
    data = content.encode("utf-8")
    await ws.write(found, data)
    verb = "overwrote" if existing is not None else "created"
    return ToolOutcome(output=f"{verb} {path} ({len(data):,} bytes)", files_changed=[path])


async def edit_file(ws: Workspace, args: dict[str, Any]) -> ToolOutcome:
    path = normalize(ws, arg(args, "path", str), allow_root=False)
    old = arg(args, "old_string", str)
    new = arg(args, "new_string", str)
    replace_all = arg(args, "replace_all", bool, False)
    if old == "":
        raise BadInput("old_string must not be empty (use write_file to create a file)")
    if old == new:
        raise BadInput("old_string and new_string are the same; nothing to change")
    found = await ws.locate(path)
    info = found.info
    if info is None:
        return error(f"file not found: {path}")
    if info.is_dir:
        return error(f"{path} is a directory")
    if info.size > MAX_READ_BYTES:
        return error(
            f"{path} is larger than {MAX_READ_BYTES // (1024 * 1024)} MB; edit it with bash"
        )
    data = await ws.read(found)
    if looks_binary(data):
        return error(f"{path} looks like a binary file; not edited")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return error(f"{path} is not valid UTF-8; not edited")
    count = text.count(old)
    if count == 0:
        return error(
            f"old_string not found in {path}; it must match exactly (whitespace and indentation "
            "included). Read the file first."
        )
    if count > 1 and not replace_all:
        return error(
            f"old_string occurs {count} times in {path}; add surrounding context to make it unique, "
            "or pass replace_all=true"
        )
    updated = text.replace(old, new) if replace_all else text.replace(old, new, 1)
    await ws.write(found, updated.encode("utf-8"))
    n = count if replace_all else 1
    return ToolOutcome(
        output=f"edited {path}: {n} replacement{'s' if n != 1 else ''}", files_changed=[path]
    )


async def _snapshot_stats(ws: Workspace) -> dict[str, tuple[int, int]]:
    entries = await ws.list_entries("", depth=64, skip_dirs=SCAN_SKIP_DIRS, limit=MAX_SCAN_ENTRIES)
    return {e.path: (e.mtime_ns, e.size) for e in entries if not e.is_dir}


async def bash(ws: Workspace, args: dict[str, Any], *, default_timeout_s: float) -> ToolOutcome:
    command = arg(args, "command", str)
    if not command.strip():
        raise BadInput("command must not be empty")
    timeout_s = float(arg(args, "timeout_s", (int, float), default_timeout_s))
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


async def glob(ws: Workspace, args: dict[str, Any]) -> ToolOutcome:
    pattern = arg(args, "pattern", str)
    base = normalize(ws, arg(args, "path", str, ""))
    if not pattern.strip():
        raise BadInput("pattern must not be empty")
    if pattern.startswith("/") or ".." in pattern.split("/"):
        raise BadInput("pattern must be relative to the workspace, without '..'")
    regex = glob_to_regex(pattern)
    top: str | Located = await ws.locate(base) if base else ""
    entries = await ws.list_entries(top, depth=64, skip_dirs=SCAN_SKIP_DIRS, limit=MAX_SCAN_ENTRIES)
    real = top.real if isinstance(top, Located) else ""
    prefix = f"{real}/" if real else ""
    hits = [e for e in entries if not e.is_dir and regex.match(e.path[len(prefix) :])]
    hits.sort(key=lambda e: (-e.mtime_ns, e.path))
    if not hits:
        return ToolOutcome(output="no files match")
    lines = [e.path for e in hits[:MAX_GLOB_RESULTS]]
    if len(hits) > MAX_GLOB_RESULTS:
        lines.append(f"[{len(hits) - MAX_GLOB_RESULTS} more not shown; narrow the pattern]")
    return ToolOutcome(output=truncate("\n".join(lines)))


async def grep(ws: Workspace, args: dict[str, Any]) -> ToolOutcome:
    pattern = arg(args, "pattern", str)
    path = normalize(ws, arg(args, "path", str, ""))
    file_glob = arg(args, "glob", str, None)
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise BadInput(f"invalid regular expression: {err}") from err
    found = await ws.locate(path)
    info = found.info
    if info is None:
        return error(f"path not found: {path or '.'}")
    files: list[FileInfo]
    if info.is_dir:
        entries = await ws.list_entries(
            found, depth=64, skip_dirs=SCAN_SKIP_DIRS, limit=MAX_SCAN_ENTRIES
        )
        files = [e for e in entries if not e.is_dir]
    else:
        files = [info]
    if file_glob:
        gre = glob_to_regex(file_glob)
        files = [
            f
            for f in files
            if (
                gre.match(f.path)
                if "/" in file_glob
                else fnmatch.fnmatchcase(posixpath.basename(f.path), file_glob)
            )
        ]
    matches: list[str] = []
    more = False
    for f in sorted(files, key=lambda e: e.path):
        if f.size > MAX_READ_BYTES or f.size == 0:
            continue
        try:  # a file listed is where it is; a symlink is followed (and confined)
            data = await ws.read(Located(f.path, f) if f.kind == "file" else f.path)
        except SandboxError:
            continue
        if looks_binary(data):
            continue
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            if regex.search(line):
                if len(matches) >= MAX_GREP_MATCHES:
                    more = True
                    break
                text = line if len(line) <= 500 else line[:500] + " [line truncated]"
                matches.append(f"{f.path}:{n}:{text}")
        if more:
            break
    if not matches:
        return ToolOutcome(output="no matches")
    if more:
        matches.append(f"[stopped at {MAX_GREP_MATCHES} matches; narrow the pattern or path]")
    return ToolOutcome(output=truncate("\n".join(matches)))


async def list_dir(ws: Workspace, args: dict[str, Any]) -> ToolOutcome:
    path = normalize(ws, arg(args, "path", str, ""))
    found = await ws.locate(path)
    info = found.info
    if info is None:
        return error(f"directory not found: {path or '.'}")
    if not info.is_dir:
        return error(f"{path} is a file, not a directory")
    entries = await ws.list_entries(found, depth=1, limit=MAX_LIST_ENTRIES + 1)
    if not entries:
        return ToolOutcome(output=f"(directory {path or '.'} is empty)")
    entries.sort(key=lambda e: e.path)
    prefix = f"{found.real}/" if found.real else ""
    lines = [
        f"{e.path[len(prefix) :]}/" if e.is_dir else f"{e.path[len(prefix) :]}  ({e.size:,} bytes)"
        for e in entries[:MAX_LIST_ENTRIES]
    ]
    if len(entries) > MAX_LIST_ENTRIES:
        lines.append(f"[more than {MAX_LIST_ENTRIES} entries; only the first shown]")
    return ToolOutcome(output="\n".join(lines))


Tool = Callable[[Workspace, dict[str, Any]], Awaitable[ToolOutcome]]


async def run_tool(
    ws: Workspace, tool: str, args: dict[str, Any], *, timeout_s: float
) -> ToolOutcome:
    """Run one tool; every failure but a vanished sandbox becomes an is_error outcome."""
    try:
        if not isinstance(args, dict):
            raise BadInput("input must be an object")
        if tool == "bash":
            return await bash(ws, args, default_timeout_s=timeout_s)
        fn = TOOLS.get(tool)
        if fn is None:
            return error(f"unknown tool {tool!r}; available: {', '.join([*TOOLS, 'bash'])}")
        return await fn(ws, args)
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
}
