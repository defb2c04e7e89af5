"""The search tools over names: ``glob`` and ``list_dir`` (``grep``, over contents, is in ``grep``)."""

from __future__ import annotations

import re
from typing import Any

from ..ports import Located
from ..workspace import Workspace
from .base import (
    MAX_GLOB_RESULTS,
    MAX_LIST_ENTRIES,
    MAX_SCAN_ENTRIES,
    SCAN_SKIP_DIRS,
    BadInput,
    ToolContext,
    ToolOutcome,
    arg,
    error,
    normalize,
    truncate,
)


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


async def glob(ws: Workspace, args: dict[str, Any], ctx: ToolContext) -> ToolOutcome:
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
    scan_cut = (
        f"[the search stopped after listing {MAX_SCAN_ENTRIES:,} entries; some files were not "
        "looked at: pass a narrower path]"
        if len(entries) >= MAX_SCAN_ENTRIES
        else ""
    )
    if not hits:
        return ToolOutcome(output="\n".join(filter(None, ["no files match", scan_cut])))
    lines = [e.path for e in hits[:MAX_GLOB_RESULTS]]
    if len(hits) > MAX_GLOB_RESULTS:
        lines.append(
            f"[{len(hits) - MAX_GLOB_RESULTS} more not shown (at most {MAX_GLOB_RESULTS:,}, "
            "newest first); narrow the pattern]"
        )
    if scan_cut:
        lines.append(scan_cut)
    return ToolOutcome(output=truncate("\n".join(lines)))


async def list_dir(ws: Workspace, args: dict[str, Any], ctx: ToolContext) -> ToolOutcome:
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
