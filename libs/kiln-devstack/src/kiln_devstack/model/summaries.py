"""Asked to summarise (a request with no tools whose message holds a ``<transcript>``, as the
agent sends when a conversation outgrows the context window), a scripted model answers with a
summary of that transcript, as a model would: the summary so far, the user's words, the files
written and edited, the commands run and the last results."""

import hashlib
import json
import re
from typing import Any

TRANSCRIPT = re.compile(r"<transcript>\n?(.*?)</transcript>", re.S)
SO_FAR = re.compile(r"<summary_so_far>\n?(.*?)</summary_so_far>", re.S)
CALL = re.compile(r"^\[call (\w+)\] (.*)$")


def summarise(request: dict[str, Any]) -> str | None:
    """The summary asked for, if the request asks for one (no tools, a ``<transcript>`` in its
    last message), else None: what a model would keep of the transcript, merged with the summary
    so far (the lines it had are kept, deduplicated)."""
    messages = request.get("messages") or []
    if request.get("tools") or not messages:
        return None
    text = text_of({"content": messages[-1].get("content", "")})
    found = TRANSCRIPT.search(text)
    if found is None:
        return None
    previous = SO_FAR.search(text)
    kept: list[str] = []
    if previous and previous.group(1).strip() not in ("", "(none)"):
        kept += [line for line in previous.group(1).strip().splitlines() if line.strip()]
    files: dict[str, str] = {}
    commands: list[str] = []
    last: list[str] = []
    for line in found.group(1).splitlines():
        if line.startswith("[user] "):
            kept.append(f"- The user said: {line[7:].strip()[:300]}")
        elif call := CALL.match(line):
            name, raw = call.groups()
            try:
                args = json.loads(raw)
            except ValueError:
                args = {}
            args = args if isinstance(args, dict) else {}
            if name in ("write_file", "edit_file") and "path" in args:
                files[str(args["path"])] = "written" if name == "write_file" else "edited"
            elif name == "bash":
                commands.append(str(args.get("command", ""))[:120])
        elif line.startswith(("[result] ", "[error] ")):
            last = [line[:200]]
    for path, how in files.items():
        kept.append(f"- {path}: {how} (in the sandbox)")
    if commands:
        kept.append(f"- Ran {len(commands)} command(s), the last: {commands[-1]}")
    kept += [f"- Last result: {line}" for line in last]
    return "\n".join(dict.fromkeys(kept)) or "- Nothing of note happened yet."


def summary_reply(request: dict[str, Any], summary: str) -> tuple[list[dict[str, Any]], str]:
    """The summary as a reply: cut at ``max_tokens`` (stop_reason ``max_tokens``), as a model's
    output is."""
    limit = 4 * int(request.get("max_tokens") or 0)
    if limit and len(summary) > limit:
        return [{"type": "text", "text": summary[:limit]}], "max_tokens"
    return [{"type": "text", "text": summary}], "end_turn"


def digest(messages: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]


def text_of(result: dict[str, Any]) -> str:
    content = result.get("content", "")
    if isinstance(content, list):
        return "\n".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return str(content)
