"""The model's context: the Messages request built from the stored turns, its size in tokens, and
compaction, in two stages, both decided here by plain functions:

* clearing: long tool output, and the long file contents the model itself sent in ``write_file``
  / ``edit_file`` calls, of turns before a watermark (``State.compacted_before``) are sent as short
  markers (the file is in the sandbox: read_file reads it back);
* summarising: when the context would still pass ``compact_to`` of the window once cleared, the
  oldest turns (before ``State.summarised_before``) are replaced by a summary written by a model
  call (``summary_request``), which is charged like any other call.

Prompt caching needs the request's prefix to stay byte-identical from one call to the next, so
compaction is not a sliding window: both watermarks move in one jump when the context passes
``compact_at`` of the model's window, far enough to bring it under ``compact_to``, and every request
until the next jump is built from exactly the same turns. Between jumps the prefix only grows.
"""

from __future__ import annotations

import json
from typing import Any

from kiln_runtime.config import ModelSpec

from .checkpoint import Checkpoint, Turn, Verbatim
from .config import AgentConfig
from .ports import ModelRequest

# the tool inputs that carry file contents the sandbox keeps (tool name -> the fields)
FILE_INPUTS: dict[str, tuple[str, ...]] = {
    "write_file": ("content",),
    "edit_file": ("old_string", "new_string"),
}

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
    text = value if isinstance(value, str) else json.dumps(value)  # (key order: same length)
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
    messages = conversation(cp, turns, config)
    users = [i for i, m in enumerate(messages) if m["role"] == "user" and m["content"]]
    for i in users[-2:]:
        *blocks, last = messages[i]["content"]
        messages[i] = {"role": "user", "content": [*blocks, {**last, "cache_control": CACHE}]}
    tool_defs = [dict(t) for t in tool_defs]
    if tool_defs:
        tool_defs[-1] = {**tool_defs[-1], "cache_control": CACHE}
    # built here from checked data: not validated again (that would copy every block)
    max_tokens = min(config.max_tokens, spec.max_output_tokens) if spec else config.max_tokens
    thinking: dict[str, Any] | None = (
        ADAPTIVE if spec and spec.thinking in ("adaptive", "always") else None
    )
    betas: list[str] = []
    if thinking is not None and (cp.state.compacted_before > 0 or cp.state.summarised_before > 0):
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


def conversation(cp: Checkpoint, turns: list[Turn], config: AgentConfig) -> list[dict[str, Any]]:
    """The request's messages: the summary (if the oldest turns were summarised) in the first
    user message, after the build's first turn; then the turns from ``summarised_before`` on,
    those before ``compacted_before`` cleared. The messages and blocks are shared with the turns,
    never changed: a turn sent as it is, or as cleared, is a ``Verbatim`` message made once (its
    JSON encoded once), and a message or block that differs (marked with cache_control, the
    summary's) is a new dict."""
    state = cp.state
    messages: list[dict[str, Any]] = []
    for turn in turns:
        if 0 < turn.seq < state.summarised_before:
            continue  # summarised
        message: dict[str, Any] = turn.message
        if turn.seq < state.compacted_before:
            message = _cleared_message(turn, config.clear_over_chars)
        if turn.seq == 0 and state.summary is not None:
            note = {"type": "text", "text": summary_note(config, state.summary)}
            message = {"role": turn.role, "content": [*message["content"], note]}
        messages.append(message)
    return messages


def _cleared_message(turn: Turn, over: int) -> dict[str, Any]:
    """The turn as a message once cleared, made once and kept with the turn: it is the same at
    every call until the next compaction, which only clears more turns."""
    key = ("cleared", over)
    found: dict[str, Any] | None = turn.derived.get(key)
    if found is None:
        cleared = [_cleared(b, over) for b in turn.content]
        changed = any(c is not b for c, b in zip(cleared, turn.content, strict=True))
        found = turn.derived[key] = Verbatim(turn.role, cleared) if changed else turn.message
    return found


def summary_note(config: AgentConfig, summary: str) -> str:
    return config.summary_note.format(summary=summary.strip()).strip()


def _cleared(block: dict[str, Any], over: int) -> dict[str, Any]:
    """The block as a turn before the clearing watermark sends it: a long tool result as a
    marker; a ``write_file`` / ``edit_file`` call with its long file contents replaced by a
    marker that says where the file is (its id, name and the other fields as they were, so the
    input is still an object of the tool's shape and its result still answers it)."""
    kind = block.get("type")
    if kind == "tool_result":
        text = block.get("content")
        if isinstance(text, str) and len(text) > over:
            return {**block, "content": f"[{len(text)} characters of old output cleared]"}
        return block
    if kind == "tool_use" and (fields := FILE_INPUTS.get(str(block.get("name")))):
        tool_input = block.get("input")
        if not isinstance(tool_input, dict):
            return block
        long = [
            f for f in fields if isinstance(tool_input.get(f), str) and len(tool_input[f]) > over
        ]
        if not long:
            return block
        path = tool_input.get("path")
        new = dict(tool_input)
        for f in long:
            new[f] = (
                f"[{len(tool_input[f])} characters cleared from this old call: the file is in "
                f"the sandbox; read_file {json.dumps(path)} reads it as it is now]"
            )
        return {**block, "input": new}
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
            + sum(_message_tokens(m) for m in request.messages)
        )
    added = 0
    for t in reversed(turns):  # in order of seq: only the newest are looked at
        if t.seq < cp.state.context_turns:
            break
        added += estimate_tokens(t.content_json)
    return counted + added


def _message_tokens(message: dict[str, Any]) -> int:
    """``estimate_tokens`` of a message, from its JSON when it has it (the same characters)."""
    if isinstance(message, Verbatim):
        return len(message.json) // CHARS_PER_TOKEN + 1
    return estimate_tokens(message)


def compaction_point(cp: Checkpoint, turns: list[Turn], config: AgentConfig) -> int | None:
    """The new clearing watermark if moving it clears anything (keep the last
    ``keep_recent_turns`` turns as they are), else None."""
    target = max(cp.state.compacted_before, len(turns) - config.keep_recent_turns)
    for turn in turns:
        if max(cp.state.compacted_before, cp.state.summarised_before) <= turn.seq < target and any(
            _cleared(b, config.clear_over_chars) is not b for b in turn.content
        ):
            return target
    return None


def summary_point(
    cp: Checkpoint,
    turns: list[Turn],
    request: ModelRequest,
    config: AgentConfig,
    window: int,
    cleared_before: int,
    *,
    force: bool = False,
) -> int | None:
    """Where the summary should end (the seq of the first turn kept: an assistant turn, so that
    the summary's user message is followed by one), if the request would still pass
    ``compact_to`` of ``window`` with the turns before ``cleared_before`` cleared; else None
    (``request``: the request as it is now, for the size of its system prompt and tools).
    ``force``: summarise even if the estimate says clearing is enough (the API said the last
    request overflowed, and nothing is left to clear).
    In one big step: the fewest oldest turns whose summary brings it under ``compact_to``, or, if
    nothing short of the last ``keep_recent_turns`` turns does, all turns before those."""
    target = config.compact_to * window
    first = max(cp.state.summarised_before, 1)
    latest = len(turns) - config.keep_recent_turns
    candidates = [t.seq for t in turns if first < t.seq <= latest and t.role == "assistant"]
    if not candidates:
        return None
    sizes = {t.seq: _turn_tokens(t, cleared_before, config) for t in turns}
    first_turn = turns[0].content if turns else []
    head = estimate_tokens(request.system) + estimate_tokens(request.tools)
    head += estimate_tokens(first_turn)
    now = estimate_tokens(summary_note(config, cp.state.summary)) if cp.state.summary else 0
    kept = sum(sizes[s] for s in sizes if s >= first)
    if head + now + kept <= target and not force:
        return None  # clearing is enough
    # room for the new summary at its longest, and the note it is sent in
    head += config.summary_max_tokens + estimate_tokens(summary_note(config, ""))
    for seq in range(first, latest + 1):
        if seq in candidates and head + kept <= target:
            return seq
        kept -= sizes.get(seq, 0)
    return candidates[-1]


def _turn_tokens(turn: Turn, cleared_before: int, config: AgentConfig) -> int:
    content = turn.content
    if turn.seq < cleared_before:
        content = [_cleared(b, config.clear_over_chars) for b in content]
    return estimate_tokens({"role": turn.role, "content": content})


def summary_request(
    cp: Checkpoint,
    turns: list[Turn],
    config: AgentConfig,
    spec: ModelSpec | None,
    upto: int,
) -> ModelRequest:
    """The model call that summarises the turns before ``upto`` not summarised yet, with the
    summary so far: one user message holding the transcript (tool output and file contents
    cleared as in the conversation, each block cut to ``summary_block_chars``), no tools, no
    thinking blocks sent (nothing is bound to anything)."""
    state = cp.state
    lines: list[str] = []
    for turn in turns:
        if turn.seq == 0 or not max(state.summarised_before, 1) <= turn.seq < upto:
            continue
        for block in turn.content:
            line = _transcript_line(turn.role, block, config)
            if line:
                lines.append(line)
    prompt = config.summary_prompt.format(
        previous=(state.summary or "(none)").strip(), transcript="\n".join(lines) or "(empty)"
    )
    thinking: dict[str, Any] | None = (
        {"type": "adaptive"} if spec and spec.thinking in ("adaptive", "always") else None
    )
    max_tokens = config.summary_max_tokens
    if spec:
        max_tokens = min(max_tokens, spec.max_output_tokens)
    return ModelRequest.model_construct(
        model=cp.model,
        system=[{"type": "text", "text": config.summary_system}],
        tools=[],
        messages=[{"role": "user", "content": [{"type": "text", "text": prompt.strip()}]}],
        max_tokens=max_tokens,
        thinking=thinking,
        output_config={"effort": state.effort} if spec and spec.effort and state.effort else None,
        betas=[],
    )


def _transcript_line(role: str, block: dict[str, Any], config: AgentConfig) -> str | None:
    cut = config.summary_block_chars
    block = _cleared(block, config.clear_over_chars)
    kind = block.get("type")
    if kind == "text":
        who = "user" if role == "user" else "assistant"
        return f"[{who}] {_cut(str(block.get('text', '')), cut)}"
    if kind == "tool_use":
        args = json.dumps(block.get("input"), ensure_ascii=False)
        return f"[call {block.get('name')}] {_cut(args, cut)}"
    if kind == "tool_result":
        text = block.get("content")
        body = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
        status = "error" if block.get("is_error") else "result"
        return f"[{status}] {_cut(body, cut)}"
    return None  # thinking blocks are the model's own and bound to their turn: not summarised


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f" [... {len(text) - limit} more]"


def summary_text(content: list[dict[str, Any]]) -> str:
    """The summary a reply wrote: its text blocks (thinking blocks are not the summary)."""
    return "\n".join(str(b.get("text", "")) for b in content if b.get("type") == "text").strip()
