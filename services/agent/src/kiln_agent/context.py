"""The model's context: the Messages request built from the stored turns, its size in tokens, and
compaction (old tool output cleared before the context window fills).

Prompt caching needs the request's prefix to stay byte-identical from one call to the next, so
compaction is not a sliding window: it moves a watermark (``State.compacted_before``) in one jump
when the context passes ``compact_at`` of the model's window, and every request until the next jump
clears exactly the same turns. Between jumps the prefix only grows.
"""

from __future__ import annotations

import json
from typing import Any

from kiln_runtime.config import ModelSpec

from .checkpoint import Checkpoint, Turn
from .config import AgentConfig
from .ports import ModelRequest

CACHE = {"type": "ephemeral"}
# Adaptive thinking with its text returned summarized: on the current models the progress the
# model writes between tool calls comes back in thinking blocks, shown to the user as narration.
ADAPTIVE: dict[str, Any] = {"type": "adaptive", "display": "summarized"}
# After a compaction: thinking blocks bound to the turns it changed are dropped by the API.
DROP_UNBOUND: dict[str, Any] = {"prefix_mismatch_behavior": "drop_block"}
BINDING_BETA = "thinking-binding-controls-2026-08-01"
CHARS_PER_TOKEN = 4


def estimate_tokens(value: Any) -> int:
    """A rough token count (a quarter of the characters of the value's JSON), for what the API
    has not counted yet."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return len(text) // CHARS_PER_TOKEN + 1


def build_request(
    cp: Checkpoint,
    turns: list[Turn],
    tool_defs: list[dict[str, Any]],
    config: AgentConfig,
    spec: ModelSpec | None = None,
) -> ModelRequest:
    """The Messages request. Cache breakpoints (four, the API's maximum): the last tool, the
    system block, and the last block of each of the last two user turns, so that the previous
    call's last breakpoint is still marked and read back whole, however many blocks a turn has.
    Long tool results of turns before the compaction watermark are sent cleared. Thinking blocks
    go back exactly as they came, a model switch included (the API drops those the new model
    cannot read). Each is bound to everything before it: once compaction has changed earlier
    turns, the request asks the API to drop the blocks so unbound (``block_binding``) instead of
    refusing the request. ``spec``: the model's entry (its
    thinking mode, effort and output limit); nothing the model would refuse is sent."""
    messages: list[dict[str, Any]] = []
    for turn in turns:
        # the blocks are shared with the turns, never changed: a block that differs (cleared,
        # marked with cache_control) is a new dict
        content = list(turn.content)
        if turn.seq < cp.state.compacted_before:
            content = [_cleared(b, config.clear_over_chars) for b in content]
        messages.append({"role": turn.role, "content": content})
    users = [i for i, m in enumerate(messages) if m["role"] == "user" and m["content"]]
    for i in users[-2:]:
        blocks = messages[i]["content"]
        blocks[-1] = {**blocks[-1], "cache_control": CACHE}
    tool_defs = [dict(t) for t in tool_defs]
    if tool_defs:
        tool_defs[-1] = {**tool_defs[-1], "cache_control": CACHE}
    # built here from checked data: not validated again (that would copy every block)
    max_tokens = min(config.max_tokens, spec.max_output_tokens) if spec else config.max_tokens
    thinking: dict[str, Any] | None = (
        ADAPTIVE if spec and spec.thinking in ("adaptive", "always") else None
    )
    betas: list[str] = []
    if thinking is not None and cp.state.compacted_before > 0:
        thinking = {**thinking, "block_binding": DROP_UNBOUND}
        betas.append(BINDING_BETA)
    effort = cp.state.effort if spec and spec.effort else None
    return ModelRequest.model_construct(
        model=cp.model,
        system=[{"type": "text", "text": cp.system, "cache_control": CACHE}],
        tools=tool_defs,
        messages=messages,
        max_tokens=max_tokens,
        thinking=thinking,
        output_config={"effort": effort} if effort else None,
        betas=betas,
    )


def _cleared(block: dict[str, Any], over: int) -> dict[str, Any]:
    text = block.get("content")
    if block.get("type") == "tool_result" and isinstance(text, str) and len(text) > over:
        return {**block, "content": f"[{len(text)} characters of old output cleared]"}
    return block


def context_tokens(cp: Checkpoint, turns: list[Turn], request: ModelRequest) -> int:
    """The tokens the next call will send: what the API counted for the last call (input, cache
    reads and writes, and the reply) plus an estimate of the turns added since; the whole request
    estimated when there is no count yet (the first call, or after a compaction)."""
    counted = cp.state.context_tokens
    if counted is None:
        return (
            estimate_tokens(request.system)
            + estimate_tokens(request.tools)
            + sum(estimate_tokens(m) for m in request.messages)
        )
    return counted + sum(
        estimate_tokens(t.content) for t in turns if t.seq >= cp.state.context_turns
    )


def compaction_point(cp: Checkpoint, turns: list[Turn], config: AgentConfig) -> int | None:
    """The new watermark if moving it clears anything (keep the last ``keep_recent_turns`` turns
    as they are), else None."""
    target = max(cp.state.compacted_before, len(turns) - config.keep_recent_turns)
    for turn in turns:
        if cp.state.compacted_before <= turn.seq < target and any(
            _cleared(b, config.clear_over_chars) is not b for b in turn.content
        ):
            return target
    return None
