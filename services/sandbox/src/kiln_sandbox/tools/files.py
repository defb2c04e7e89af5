"""The file tools: ``read_file``, ``write_file``, ``edit_file``."""

from __future__ import annotations

import hashlib
from typing import Any

from ..workspace import Workspace
from .base import (
    DEFAULT_READ_LINES,
    MAX_LINE_CHARS,
    MAX_OUTPUT_CHARS,
    MAX_READ_BYTES,
    BadInput,
    ToolContext,
    ToolOutcome,
    arg,
    error,
    looks_binary,
    normalize,
    truncate,
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def read_file(ws: Workspace, args: dict[str, Any], ctx: ToolContext) -> ToolOutcome:
    path = normalize(ws, arg(args, "path", str), allow_root=False)
    offset = arg(args, "offset", int, 1)
    limit = arg(args, "limit", int, DEFAULT_READ_LINES)
    if offset < 1:
        offset = 1 if offset == 0 else offset
        if offset < 0:
            raise BadInput("offset is a 1-based line number and must be >= 1")
    if limit < 1:
        raise BadInput("limit must be >= 1")
    found, data = await ws.fetch(path, MAX_READ_BYTES)
    info = found.info
    if info is None:
        return error(f"file not found: {path}")
    if info.is_dir:
        return error(f"{path} is a directory; use list_dir")
    if data is None and info.size <= MAX_READ_BYTES:
        return error(f"{path} is not a regular file")
    if data is None:
        return error(
            f"{path} is {info.size:,} bytes, larger than the {MAX_READ_BYTES // (1024 * 1024)} MB "
            "read limit; use bash (e.g. head, sed -n, grep) to look at parts of it"
        )
    if looks_binary(data):
        return error(f"{path} looks like a binary file ({len(data):,} bytes); not shown")
    text = data.decode("utf-8", errors="replace")
    lines = text.splitlines()
    if text and offset > len(lines):
        return error(f"offset {offset} is past the end of {path} ({len(lines)} lines)")
    # what the model is shown of the file (any part of it) counts as a read of its content
    await ctx.reads.saw(ctx.build_id, found.real, _sha256(data), ctx.call.call_id)
    if not text:
        return ToolOutcome(output=f"(file {path} is empty)")
    chosen = lines[offset - 1 : offset - 1 + limit]
    cut_lines = 0
    numbered: list[str] = []
    size = 0
    for n, line in enumerate(chosen, start=offset):
        if len(line) > MAX_LINE_CHARS:
            line = line[:MAX_LINE_CHARS] + " [line truncated]"
            cut_lines += 1
        entry = f"{n:>4}\t{line}"
        if numbered and size + len(entry) + 1 > MAX_OUTPUT_CHARS:
            break
        numbered.append(entry)
        size += len(entry) + 1
    body = "\n".join(numbered)
    last = offset - 1 + len(numbered)
    notes: list[str] = []
    if last < len(lines):
        why = (
            f"the {MAX_OUTPUT_CHARS:,}-character output limit"
            if len(numbered) < len(chosen)
            else f"limit={limit}"
            if "limit" in args and args["limit"] is not None
            else f"the default limit of {DEFAULT_READ_LINES:,} lines"
        )
        notes.append(
            f"showing lines {offset}-{last} of {len(lines)} ({why}); pass offset={last + 1} "
            "to read on"
        )
    if cut_lines:
        notes.append(
            f"{cut_lines} line{'s' if cut_lines != 1 else ''} longer than {MAX_LINE_CHARS:,} "
            "characters cut"
        )
    if notes:
        body += "\n[" + "; ".join(notes) + "]"
    return ToolOutcome(output=truncate(body))


async def write_file(ws: Workspace, args: dict[str, Any], ctx: ToolContext) -> ToolOutcome:
    path = normalize(ws, arg(args, "path", str), allow_root=False)
    content = arg(args, "content", str)
    data = content.encode("utf-8")
    found = await ws.store(path, data)
    existing = found.info
    if existing is not None and existing.is_dir:
        return error(f"{path} is a directory")
    await ctx.reads.saw(ctx.build_id, found.real, _sha256(data), ctx.call.call_id)
    verb = "overwrote" if existing is not None else "created"
    return ToolOutcome(output=f"{verb} {path} ({len(data):,} bytes)", files_changed=[path])


async def edit_file(ws: Workspace, args: dict[str, Any], ctx: ToolContext) -> ToolOutcome:
    path = normalize(ws, arg(args, "path", str), allow_root=False)
    old = arg(args, "old_string", str)
    new = arg(args, "new_string", str)
    replace_all = arg(args, "replace_all", bool, False)
    if old == "":
        raise BadInput("old_string must not be empty (use write_file to create a file)")
    if old == new:
        raise BadInput("old_string and new_string are the same; nothing to change")
    found, data = await ws.fetch(path, MAX_READ_BYTES)
    info = found.info
    if info is None:
        return error(f"file not found: {path}")
    if info.is_dir:
        return error(f"{path} is a directory")
    if data is None and info.size <= MAX_READ_BYTES:
        return error(f"{path} is not a regular file")
    if data is None:
        return error(
            f"{path} is larger than {MAX_READ_BYTES // (1024 * 1024)} MB; edit it with bash"
        )
    if looks_binary(data):
        return error(f"{path} looks like a binary file; not edited")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return error(f"{path} is not valid UTF-8; not edited")
    seen = await ctx.reads.last_seen(ctx.build_id, found.real)
    if seen is None:
        return error(
            f"{path} has not been read yet; read it with read_file first, then edit it "
            "(edits are made only to files whose current content you have seen)"
        )
    if seen != _sha256(data):
        return error(
            f"{path} has changed since you last read it (a command or another tool changed "
            "it); read it again with read_file before editing it"
        )
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
    encoded = updated.encode("utf-8")
    await ws.write(found, encoded)
    await ctx.reads.saw(ctx.build_id, found.real, _sha256(encoded), ctx.call.call_id)
    n = count if replace_all else 1
    return ToolOutcome(
        output=f"edited {path}: {n} replacement{'s' if n != 1 else ''}", files_changed=[path]
    )
