"""A Messages request's prompt, read once: each tool, system block and message block with the
JSON the scripted model counts its tokens from and binds thinking signatures to (``rules``,
``thinking``, ``usage`` all read the same parts)."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

_SORTED = json.JSONEncoder(sort_keys=True)


class Part(NamedTuple):
    """One block of the prompt: ``path`` is ``messages.i.content.j`` for a message block (whose
    JSON carries its ``role``), None for a tool or a system block."""

    path: str | None
    role: str
    block: dict[str, Any]
    text: str  # the block's JSON, keys sorted, cache_control aside

    @property
    def tokens(self) -> int:
        """A rough token count: a quarter of the characters of the block's JSON."""
        return len(self.text) // 4

    def bound(self) -> bytes:
        """What a thinking signature binds of this block: its JSON without null fields (a client
        may send back a field the reply left out as null)."""
        if None not in self.block.values():
            return self.text.encode()
        return encode(self.block, self.role if self.path is not None else None, drop_none=True)


def encode(block: dict[str, Any], role: str | None, *, drop_none: bool = False) -> bytes:
    return _json(block, role, drop_none).encode()


def _json(block: dict[str, Any], role: str | None, drop_none: bool = False) -> str:
    clean = {
        k: v for k, v in block.items() if k != "cache_control" and not (drop_none and v is None)
    }
    return _SORTED.encode(clean if role is None else {"role": role, **clean})


def parts(request: dict[str, Any]) -> list[Part]:
    """The request's tools, then its system blocks, then its message blocks, in order (a string
    is a text block; what is not an object is skipped)."""
    out: list[Part] = []
    for tool in request.get("tools") or []:
        if isinstance(tool, dict):
            out.append(Part(None, "tool", tool, _json(tool, None)))
    system = request.get("system") or []
    for block in [{"type": "text", "text": system}] if isinstance(system, str) else system:
        if isinstance(block, dict):
            out.append(Part(None, "system", block, _json(block, None)))
    for i, message in enumerate(request.get("messages") or []):
        content = message.get("content")
        role = str(message.get("role"))
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for j, block in enumerate(blocks or []):
            if isinstance(block, dict):
                out.append(Part(f"messages.{i}.content.{j}", role, block, _json(block, role)))
    return out
