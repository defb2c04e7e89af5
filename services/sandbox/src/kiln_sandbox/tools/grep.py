"""The ``grep`` tool: one ``grep`` in the sandbox for the whole search, its output read back as
the model asked (content, files with matches, or counts), within the limits of a tool result."""

from __future__ import annotations

import re
import shlex
from typing import Any, cast

from ..workspace import Workspace
from .base import (
    MAX_GREP_MATCHES,
    MAX_GREP_RAW_BYTES,
    SCAN_SKIP_DIRS,
    BadInput,
    ToolContext,
    ToolOutcome,
    arg,
    error,
    normalize,
    truncate,
)
from .search import glob_to_regex

FILE_TYPES: dict[str, tuple[str, ...]] = {
    "py": ("*.py", "*.pyi"),
    "js": ("*.js", "*.mjs", "*.cjs", "*.jsx"),
    "ts": ("*.ts", "*.tsx", "*.mts", "*.cts"),
    "html": ("*.html", "*.htm"),
    "css": ("*.css", "*.scss", "*.sass", "*.less"),
    "json": ("*.json",),
    "md": ("*.md", "*.markdown"),
    "yaml": ("*.yaml", "*.yml"),
    "toml": ("*.toml",),
    "sh": ("*.sh", "*.bash"),
    "go": ("*.go",),
    "rust": ("*.rs",),
    "java": ("*.java",),
    "c": ("*.c", "*.h"),
    "cpp": ("*.cpp", "*.cc", "*.cxx", "*.hpp", "*.hh", "*.h"),
    "rb": ("*.rb",),
    "php": ("*.php",),
    "sql": ("*.sql",),
    "txt": ("*.txt",),
}

OUTPUT_MODES = ("content", "files_with_matches", "count")
MAX_GREP_LINE_CHARS = 500

# One grep for the whole search, inside the sandbox: PCRE (-P) where grep has it, else ERE (-E).
# Prints "<exit code> <bytes of output>", then at most RAW bytes of grep's output, a NUL and the
# head of its error output.
_GREP = r"""
raw=$1; shift
o=$(mktemp) && e=$(mktemp) || exit 90
if printf 'x\n' | grep -qP 'x' 2>/dev/null; then f=-P; else f=-E; fi
grep "$f" "$@" >"$o" 2>"$e"; rc=$?
printf '%s %s\n' "$rc" "$(stat -c %s "$o")"
head -c "$raw" "$o"; printf '\0'; head -c 2000 "$e"
rm -f "$o" "$e"
"""


def _expand_braces(pattern: str) -> list[str]:
    """``*.{ts,tsx}`` -> ``*.ts``, ``*.tsx`` (one level; grep's --include has no braces)."""
    start = pattern.find("{")
    end = pattern.find("}", start + 1)
    if start == -1 or end == -1:
        return [pattern]
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    return [x for alt in body.split(",") for x in _expand_braces(head + alt + tail)]


def _int_arg(args: dict[str, Any], name: str) -> int | None:
    value = arg(args, name, int, None)
    if value is not None and value < 0:
        raise BadInput(f"{name} must be >= 0")
    return cast("int | None", value)


async def grep(ws: Workspace, args: dict[str, Any], ctx: ToolContext) -> ToolOutcome:
    """One ``grep`` over the path, in the sandbox; Claude Code's Grep options."""
    pattern = arg(args, "pattern", str)
    path = normalize(ws, arg(args, "path", str, ""))
    file_glob = arg(args, "glob", str, None)
    file_type = arg(args, "type", str, None)
    mode = arg(args, "output_mode", str, "files_with_matches")
    if mode not in OUTPUT_MODES:
        raise BadInput(f"output_mode must be one of {', '.join(OUTPUT_MODES)}")
    ignore_case = arg(args, "-i", bool, False)
    numbers = arg(args, "-n", bool, True)
    after, before, around = _int_arg(args, "-A"), _int_arg(args, "-B"), _int_arg(args, "-C")
    head_limit = arg(args, "head_limit", int, MAX_GREP_MATCHES)
    if head_limit < 1:
        raise BadInput("head_limit must be >= 1")
    if not pattern:
        raise BadInput("pattern must not be empty")
    if file_type is not None and file_type not in FILE_TYPES:
        raise BadInput(f"unknown type {file_type!r}; known: {', '.join(sorted(FILE_TYPES))}")
    found = await ws.locate(path)
    if found.info is None:
        return error(f"path not found: {path or '.'}")
    target = found.real or "."
    flags = ["-r", "-I", "-s", "-Z", "-H"]
    if mode == "files_with_matches":
        flags.append("-l")
    elif mode == "count":
        flags.append("-c")
    else:
        if numbers:
            flags.append("-n")
        for name, value in (("-A", after), ("-B", before), ("-C", around)):
            if value:
                flags += [name, str(value)]
    if ignore_case:
        flags.append("-i")
    inside = set(target.split("/"))
    flags += [f"--exclude-dir={d}" for d in sorted(SCAN_SKIP_DIRS - inside)]
    # A type or a plain name glob is a --include; a glob with a '/' (or next to a type) is
    # checked here, on each file's workspace-relative path.
    path_glob: re.Pattern[str] | None = None
    if file_type is not None:
        flags += [f"--include={g}" for g in FILE_TYPES[file_type]]
        if file_glob:
            path_glob = glob_to_regex(file_glob if "/" in file_glob else f"**/{file_glob}")
    elif file_glob:
        name = file_glob.rsplit("/", 1)[-1]
        flags += [f"--include={g}" for g in _expand_braces(name)]
        if "/" in file_glob:
            path_glob = glob_to_regex(file_glob)
    command = " ".join(
        ["bash", "-c", shlex.quote(_GREP), "kiln", str(MAX_GREP_RAW_BYTES)]
        + [shlex.quote(x) for x in [*flags, "-e", pattern, "--", target]]
    )
    result = await ws.run(
        command, timeout_s=GREP_TIMEOUT_S, max_output=2 * (MAX_GREP_RAW_BYTES + 8192)
    )
    if result.timed_out:
        return error(f"grep did not finish within {GREP_TIMEOUT_S:g}s; narrow the path or pattern")
    raw = (result.head + result.tail).decode("utf-8", errors="replace")
    first, _, rest = raw.partition("\n")
    try:
        rc, size = (int(x) for x in first.split())
    except ValueError:
        return error(f"grep failed: {raw.strip()[-500:]}")
    out, _, err = rest.rpartition("\0")
    if rc == 1 or (rc == 2 and not out):
        if rc == 2 and err.strip():
            return error(f"grep failed: {err.strip()[-500:]}")
        return ToolOutcome(output="no matches" if rc == 1 else "no matches (no readable files)")
    notes: list[str] = []
    if size > MAX_GREP_RAW_BYTES:
        notes.append(
            f"grep's output passed {MAX_GREP_RAW_BYTES // 1024:,} KB; only its first part is "
            "shown: narrow the pattern, path or glob"
        )
    lines = _grep_results(out, mode, path_glob, cut=size > MAX_GREP_RAW_BYTES)
    if not lines:
        return ToolOutcome(output="no matches")
    total = len(lines)
    if total > head_limit:
        unit = {"content": "lines", "files_with_matches": "files", "count": "files"}[mode]
        notes.append(f"showing the first {head_limit} of {total} {unit} (head_limit)")
        lines = lines[:head_limit]
    body = "\n".join(lines)
    if mode == "count":
        body += f"\n[{sum(int(x.rsplit(':', 1)[1]) for x in lines)} matching lines in all]"
    if notes:
        body += "\n[" + "; ".join(notes) + "]"
    return ToolOutcome(output=truncate(body))


GREP_TIMEOUT_S = 60.0
_CONTEXT_LINE = re.compile(r"\d+-")


def _records(out: str, *, cut: bool) -> list[tuple[str, str]]:
    """grep -Z's ``path NUL text NEWLINE`` records (a path may hold a newline, a text line
    cannot); context groups' ``--`` separators are dropped; a last record cut short too."""
    found: list[tuple[str, str]] = []
    pos = 0
    while pos < len(out):
        if out.startswith("--\n", pos):
            pos += 3
            continue
        nul = out.find("\0", pos)
        if nul == -1:
            break
        end = out.find("\n", nul)
        if end == -1:
            if not cut:
                found.append((out[pos:nul], out[nul + 1 :]))
            break
        found.append((out[pos:nul], out[nul + 1 : end]))
        pos = end + 1
    return found


def _grep_results(
    out: str, mode: str, path_glob: re.Pattern[str] | None, *, cut: bool
) -> list[str]:
    """grep -Z's records as ``path:...`` lines, files in path order, paths relative to the
    workspace; ``path_glob`` keeps only the files whose path matches."""

    def clean(p: str) -> str:
        return p.removeprefix("./")

    def keep(p: str) -> bool:
        return path_glob is None or bool(path_glob.match(p))

    if mode == "files_with_matches":
        names = [clean(p) for p in out.split("\0") if p.strip()]
        if cut and names:
            names = names[:-1]  # the last name may be cut short
        return sorted(p for p in names if keep(p))
    counts: list[tuple[str, int]] = []
    blocks: dict[str, list[str]] = {}
    for p, text in _records(out, cut=cut):
        p = clean(p)
        if not keep(p):
            continue
        if mode == "count":
            if text.strip().isdigit() and int(text) > 0:
                counts.append((p, int(text)))
            continue
        if len(text) > MAX_GREP_LINE_CHARS:
            text = text[:MAX_GREP_LINE_CHARS] + " [line truncated]"
        # with line numbers, a context line is "N-text" (a match "N:text"): "path-N-text"
        sep = "-" if _CONTEXT_LINE.match(text) else ":"
        blocks.setdefault(p, []).append(f"{p}{sep}{text}")
    if mode == "count":
        return [f"{p}:{n}" for p, n in sorted(counts)]
    return [line for p in sorted(blocks) for line in blocks[p]]
