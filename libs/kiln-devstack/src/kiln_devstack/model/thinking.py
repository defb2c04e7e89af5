"""Thinking blocks as the scripted model server makes, signs and checks them (the platform
docs' "Building with extended thinking" and "Preserved thinking"; what the rules say of them:
``rules``)."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from .catalogue import ModelInfo, invalid
from .prompt import Part, encode

if TYPE_CHECKING:
    from .rules import Checked


SECRET = b"scripted-model-thinking-signatures"


def sign(model: str, prefix: bytes, payload: str) -> str:
    token = json.dumps({"m": model, "h": _mac(model, prefix, payload)}).encode()
    return base64.b64encode(token).decode()


def _mac(model: str, prefix: bytes, payload: str) -> str:
    message = model.encode() + b"\0" + prefix + b"\0" + payload.encode()
    return hmac.new(SECRET, message, "sha256").hexdigest()


def _unsign(value: Any) -> tuple[str, str] | None:
    try:
        token = json.loads(base64.b64decode(str(value), validate=True))
        return str(token["m"]), str(token["h"])
    except (ValueError, KeyError, TypeError):
        return None


def _signed(block: dict[str, Any]) -> tuple[Any, str]:
    if block.get("type") == "thinking":
        return block.get("signature"), str(block.get("thinking", ""))
    return block.get("data"), ""


def verify_thinking(
    prompt: list[Part], info: ModelInfo, drop_unbound: bool, dropped: list[dict[str, str]]
) -> Any:
    """Each thinking block of the request is checked against its prefix as sent; the hasher over
    the whole prompt is returned (the prefix of the reply's blocks)."""
    hasher = hashlib.sha256()
    for part in prompt:
        block, path = part.block, part.path
        if path is not None and block.get("type") in ("thinking", "redacted_thinking"):
            value, text = _signed(block)
            token = _unsign(value)
            if token is None:
                raise invalid(f"{path}: Invalid `signature` in `thinking` block")
            model, mac = token
            if model != info.id and model not in info.reads:
                dropped.append(
                    {"type": "thinking_dropped", "path": path, "reason": "model_binding_mismatch"}
                )
            elif not hmac.compare_digest(_mac(model, hasher.copy().digest(), text), mac):
                if not drop_unbound:
                    raise invalid(
                        f"{path}: Invalid `signature` in `thinking` block. The block is "
                        "bound to a different conversation. Remove the block, or set "
                        '`thinking.block_binding.prefix_mismatch_behavior` to "drop_block".'
                    )
                dropped.append(
                    {"type": "thinking_dropped", "path": path, "reason": "prefix_binding_mismatch"}
                )
        hasher.update(part.bound())
    return hasher


class Issued:
    """The thinking blocks each reply with tool calls was sent with, by tool_use id, to check that
    the latest assistant turn of a tool-use loop comes back with them (bounded)."""

    def __init__(self, limit: int = 100_000) -> None:
        self.by_call: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.paused_turns: OrderedDict[str, None] = OrderedDict()
        self.limit = limit

    def paused(self, message: dict[str, Any]) -> bool:
        """The message is a reply that stopped with pause_turn, sent back for the model to go
        on with (the one assistant turn a request may end with)."""
        return _key(message.get("content")) in self.paused_turns

    def remember(self, content: list[dict[str, Any]], stop_reason: str = "") -> None:
        if stop_reason == "pause_turn":
            self.paused_turns[_key(content)] = None
            while len(self.paused_turns) > self.limit:
                self.paused_turns.popitem(last=False)
        thinking = [b for b in content if b.get("type") in ("thinking", "redacted_thinking")]
        for block in content:
            if block.get("type") == "tool_use" and thinking:
                self.by_call[block["id"]] = copy.deepcopy(thinking)
        while len(self.by_call) > self.limit:
            self.by_call.popitem(last=False)

    def check_latest(self, messages: list[dict[str, Any]], dropped: set[str]) -> None:
        """The last assistant turn, answered by tool results, must start with the thinking
        blocks it was sent with, unchanged (unless the API dropped them itself)."""
        for i in range(len(messages) - 1, -1, -1):
            if messages[i].get("role") != "assistant":
                continue
            content = messages[i].get("content")
            if not isinstance(content, list):
                return
            calls = [b.get("id") for b in content if b.get("type") == "tool_use"]
            sent = next((self.by_call[c] for c in calls if c in self.by_call), None)
            if sent is None:
                return
            if any(p.startswith(f"messages.{i}.") for p in dropped):
                return
            head = content[: len(sent)]
            if head and head[0].get("type") not in ("thinking", "redacted_thinking"):
                raise invalid(
                    f"messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, "
                    f"but found `{head[0].get('type')}`. When `thinking` is enabled, a final "
                    "`assistant` message must start with a thinking block (preceeding the "
                    "lastmost set of `tool_use` and `tool_result` blocks). We recommend you "
                    "include thinking blocks from previous turns. To avoid this requirement, "
                    "disable `thinking`."
                )
            if [_strip(b) for b in head] != [_strip(b) for b in sent]:
                raise invalid(
                    "`thinking` or `redacted_thinking` blocks in the latest assistant message "
                    "cannot be modified. These blocks must remain as they were in the original "
                    "response."
                )
            return


def _key(content: Any) -> str:
    blocks = [_strip(b) for b in content] if isinstance(content, list) else content
    return hashlib.sha256(json.dumps(blocks, sort_keys=True).encode()).hexdigest()


def _strip(block: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in block.items() if k != "cache_control"}


def with_thinking(
    checked: Checked, content: list[dict[str, Any]], digest: str
) -> list[dict[str, Any]]:
    """The reply's content as the model sends it: a signed thinking block first (its text shown
    only when summarized), notes before tool calls as thinking blocks, now and then a
    redacted_thinking block; each signed over its prefix."""
    if not checked.thinking:
        return content
    calls = any(b.get("type") == "tool_use" for b in content)
    names = [str(b.get("name")) for b in content if b.get("type") == "tool_use"]
    summary = f"Next: {', '.join(dict.fromkeys(names))}." if names else "Summing up the work."
    out: list[dict[str, Any]] = [{"type": "thinking", "thinking": summary}]
    if hashlib.sha256(digest.encode()).digest()[0] % 4 == 0:
        out.append({"type": "redacted_thinking", "data": ""})
    for block in content:
        if calls and block.get("type") == "text":
            out.append({"type": "thinking", "thinking": block["text"]})  # a progress note
        else:
            out.append(block)
    hasher = checked.prefix.copy()
    signed: list[dict[str, Any]] = []
    for block in out:
        if block["type"] == "thinking":
            text = block["thinking"] if checked.summarized else ""
            block = {
                "type": "thinking",
                "thinking": text,
                "signature": sign(checked.info.id, hasher.copy().digest(), text),
            }
        elif block["type"] == "redacted_thinking":
            block = {
                "type": "redacted_thinking",
                "data": sign(checked.info.id, hasher.copy().digest(), ""),
            }
        signed.append(block)
        hasher.update(encode(block, "assistant", drop_none=True))
    return signed
