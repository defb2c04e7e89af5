"""The Messages API's rules, as the scripted model server enforces them: a stand-in modelled on the
Claude platform docs (models overview, each model's migration guide, "Building with extended
thinking", "Preserved thinking", the effort and errors pages), not on what Kiln sends.

* Models: a catalogue of current, legacy and retired models. An alias of a model that has dated
  snapshots is answered with the snapshot's id (``claude-haiku-4-5`` → ``claude-haiku-4-5-20251001``);
  a retired or unknown model is a 404 ``not_found_error``. ``GET /v1/models[/{id}]`` serves it.
* Thinking: on a 5.x model, a request without ``thinking`` runs adaptive thinking, and every reply
  starts with a signed thinking block (empty text unless ``display`` is ``summarized``); the notes
  the model writes before its tool calls come back as thinking blocks too.
* Sending thinking back: a signature binds its block to the model and to everything before it
  (system, tools, earlier messages and blocks; not ``cache_control``). A block whose prefix or text
  changed is a 400 (``Invalid `signature` in `thinking` block``), or dropped when the request sets
  ``thinking.block_binding.prefix_mismatch_behavior: drop_block`` (with its beta header). A block
  of a model the requested one cannot read is dropped silently (``input_transformations``). The
  latest assistant turn of a tool-use loop must carry the thinking blocks it was sent with.
* Refused settings: sampling parameters, ``thinking.type`` enabled/disabled where the model
  refuses them, an unknown ``display``, forced ``tool_choice``, assistant prefill, an effort the
  model does not take, ``max_tokens`` over the model's limit: each a 400 in the API's error shape.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

SECRET = b"scripted-model-thinking-signatures"
BINDING_BETA = "thinking-binding-controls-2026-08-01"
EFFORTS = ("low", "medium", "high", "xhigh", "max")


@dataclass(frozen=True)
class ModelInfo:
    id: str
    display_name: str
    created_at: str
    lifecycle: str  # active | deprecated | retired
    max_input_tokens: int
    max_tokens: int
    thinking: tuple[str, ...]  # the thinking.type values it accepts
    default_thinking: str | None  # what runs without a thinking field (None: no thinking)
    effort: bool
    aliases: tuple[str, ...] = ()
    forced_tool_choice: bool = True
    sampling: bool = True  # accepts temperature / top_p / top_k
    reads: frozenset[str] = field(default_factory=frozenset)  # whose thinking it can read
    retires_at: str | None = None

    @property
    def adaptive_by_default(self) -> bool:
        return self.default_thinking == "adaptive"

    def card(self) -> dict[str, Any]:
        types = {t: {"supported": True} for t in ("adaptive", "enabled", "disabled")}
        for t in types:
            types[t]["supported"] = t in self.thinking
        return {
            "type": "model",
            "id": self.id,
            "display_name": self.display_name,
            "created_at": self.created_at,
            "max_input_tokens": self.max_input_tokens,
            "max_tokens": self.max_tokens,
            "lifecycle": self.lifecycle,
            "deprecated_at": None if self.lifecycle == "active" else self.created_at,
            "retires_at": self.retires_at,
            "capabilities": {
                "effort": {e: {"supported": self.effort} for e in EFFORTS},
                "thinking": {"types": types},
            },
        }


def _five(mid: str, name: str, created: str, default_thinking: str, **kw: Any) -> ModelInfo:
    return ModelInfo(
        id=mid,
        display_name=name,
        created_at=created,
        lifecycle=kw.pop("lifecycle", "active"),
        max_input_tokens=1_000_000,
        max_tokens=128_000,
        thinking=kw.pop("thinking", ("adaptive",)),
        default_thinking=default_thinking,
        effort=True,
        sampling=False,
        **kw,
    )


CATALOGUE: tuple[ModelInfo, ...] = (
    _five("claude-fable-5-2", "Claude Fable 5.2", "2026-11-09T00:00:00Z", "adaptive",
          forced_tool_choice=False, reads=frozenset({"claude-fable-5-2"})),
    _five("claude-haiku-5-5", "Claude Haiku 5.5", "2026-10-07T00:00:00Z", "adaptive",
          thinking=("adaptive", "disabled")),
    _five("claude-sonnet-5-5", "Claude Sonnet 5.5", "2026-09-28T00:00:00Z", "adaptive",
          thinking=("adaptive", "between_tools"), forced_tool_choice=False,
          reads=frozenset({"claude-sonnet-5"})),
    _five("claude-opus-5-5", "Claude Opus 5.5", "2026-09-22T00:00:00Z", "adaptive",
          forced_tool_choice=False, reads=frozenset({"claude-sonnet-5-5"})),
    _five("claude-fable-5-1", "Claude Fable 5.1", "2026-09-01T00:00:00Z", "adaptive",
          forced_tool_choice=False, reads=frozenset({"claude-opus-5", "claude-opus-5-5"})),
    _five("claude-opus-5", "Claude Opus 5", "2026-07-24T00:00:00Z", "adaptive",
          thinking=("adaptive", "disabled")),
    _five("claude-sonnet-5", "Claude Sonnet 5", "2026-06-30T00:00:00Z", "adaptive",
          thinking=("adaptive", "disabled")),
    ModelInfo("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z", "active",
              200_000, 64_000, ("enabled", "disabled"), None, False, ("claude-haiku-4-5",)),
    ModelInfo("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z",
              "retired", 200_000, 64_000, ("enabled", "disabled"), None, False,
              ("claude-sonnet-4-5",), retires_at="2026-11-30T00:00:00Z"),
    ModelInfo("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z", "retired",
              200_000, 32_000, ("enabled", "disabled"), None, False, ("claude-opus-4-1",),
              retires_at="2026-08-05T00:00:00Z"),
)  # fmt: skip

BY_ID: dict[str, ModelInfo] = {m.id: m for m in CATALOGUE} | {
    a: m for m in CATALOGUE for a in m.aliases
}


class ApiError(Exception):
    """A refusal in the API's error shape."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


def lookup(model: Any, *, for_messages: bool = True) -> ModelInfo:
    """The catalogue's model for an id or alias; 404 for an unknown one, and (for a Messages
    request) for a retired one."""
    info = BY_ID.get(model) if isinstance(model, str) else None
    if info is None or (for_messages and info.lifecycle == "retired"):
        raise ApiError(404, "not_found_error", f"model: {model}")
    return info


# ------------------------------------------------------------------------------ the rules


@dataclass
class Checked:
    """A request that passed the rules: the model, whether it thinks and shows its thinking."""

    info: ModelInfo
    thinking: bool
    summarized: bool
    dropped: list[dict[str, str]] = field(default_factory=list)  # input_transformations


def check(request: dict[str, Any], betas: set[str], issued: Issued) -> Checked:
    """Apply the rules to a Messages request body; ApiError for what the model refuses."""
    info = lookup(request.get("model"))
    if not isinstance(request.get("max_tokens"), int) or request["max_tokens"] < 1:
        raise invalid("max_tokens: Field required")
    if request["max_tokens"] > info.max_tokens:
        raise invalid(
            f"max_tokens: {request['max_tokens']} > {info.max_tokens}, which is the maximum "
            f"allowed number of output tokens for {info.id}"
        )
    if not info.sampling:
        for name in ("temperature", "top_p", "top_k"):
            if name in request:
                raise invalid(f"`{name}` is deprecated for this model.")
    thinking, summarized, drop_unbound = _thinking(request, info, betas)
    _tool_choice(request, info, thinking)
    _effort(request, info)
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: at least one message is required")
    if thinking and messages[-1].get("role") == "assistant" and not issued.paused(messages[-1]):
        raise invalid(
            "This model does not support assistant message prefill. The conversation must end "
            "with a user message."
        )
    checked = Checked(info, thinking, summarized)
    verify_thinking(request, info, drop_unbound, checked.dropped)
    issued.check_latest(messages, {d["path"] for d in checked.dropped})
    return checked


def prompt_tokens(request: dict[str, Any]) -> int:
    """The prompt's tokens as the scripted model counts them (a quarter of the characters of each
    tool, system block and message block's JSON, cache_control aside), as its usage reports them."""
    total = 0
    items: list[Any] = list(request.get("tools") or [])
    system = request.get("system") or []
    items += [{"type": "text", "text": system}] if isinstance(system, str) else list(system)
    for m in request.get("messages") or []:
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        items += [{"role": m.get("role"), **b} for b in blocks or [] if isinstance(b, dict)]
    for item in items:
        clean = {k: v for k, v in item.items() if k != "cache_control"}
        total += len(json.dumps(clean, sort_keys=True)) // 4
    return total


def check_length(request: dict[str, Any], window: int) -> None:
    """A prompt longer than the context window is refused before anything runs."""
    if (size := prompt_tokens(request)) > window:
        raise invalid(f"prompt is too long: {size} tokens > {window} maximum")


def _thinking(request: dict[str, Any], info: ModelInfo, betas: set[str]) -> tuple[bool, bool, bool]:
    """(thinks, shows summarized text, drops unbound blocks) for the request's ``thinking``."""
    raw = request.get("thinking")
    if raw is None:
        return info.adaptive_by_default, False, False
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise invalid("thinking: Input should be an object with a `type`")
    kind = raw["type"]
    if kind not in info.thinking:
        if kind == "enabled":
            raise invalid(
                '"thinking.type.enabled" is not supported for this model. Use '
                '"thinking.type.adaptive" and "output_config.effort" to control thinking '
                "behavior."
            )
        if kind == "disabled" and "between_tools" in info.thinking:
            raise invalid(
                'To turn thinking off on this model, send "thinking": {"type": "between_tools"} '
                'instead of {"type": "disabled"}.'
            )
        if kind == "disabled":
            raise invalid(
                '"thinking.type.disabled" is not supported for this model. Use '
                '"thinking.type.adaptive" and "output_config.effort" to control thinking '
                "behavior."
            )
        if kind == "adaptive":
            raise invalid("adaptive thinking is not supported on this model")
        raise invalid(f"thinking.type: unknown value {kind!r}")
    allowed = {"type", "display", "block_binding"} if kind == "adaptive" else {"type"}
    if kind == "enabled":
        allowed |= {"budget_tokens", "display"}
    extra = set(raw) - allowed
    if "block_binding" in raw and BINDING_BETA not in betas:
        extra.add("block_binding")
    if extra:
        raise invalid(f"thinking.{sorted(extra)[0]}: Extra inputs are not permitted")
    display = raw.get("display", "omitted")
    if display not in ("omitted", "summarized"):
        raise invalid(f"thinking.display: unknown value {display!r}")
    drop = False
    if "block_binding" in raw:
        behaviour = (raw["block_binding"] or {}).get("prefix_mismatch_behavior")
        if behaviour not in ("error", "drop_block"):
            raise invalid("thinking.block_binding.prefix_mismatch_behavior: unknown value")
        drop = behaviour == "drop_block"
    return kind != "disabled", display == "summarized", drop


def _tool_choice(request: dict[str, Any], info: ModelInfo, thinking: bool) -> None:
    choice = request.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
        if not info.forced_tool_choice or (thinking and info.default_thinking is None):
            raise invalid('tool_choice: type "tool" and "any" are not supported for this model.')


def _effort(request: dict[str, Any], info: ModelInfo) -> None:
    config = request.get("output_config")
    if config is None:
        return
    if not isinstance(config, dict):
        raise invalid("output_config: Input should be an object")
    if "effort" in config:
        if not info.effort:
            raise invalid("output_config.effort: this model does not support effort")
        if config["effort"] not in EFFORTS:
            raise invalid(f"output_config.effort: Input should be one of {', '.join(EFFORTS)}")


# ------------------------------------------------------------------------------ signatures


def _canonical(role: str, block: dict[str, Any]) -> bytes:
    clean = {k: v for k, v in block.items() if k != "cache_control" and v is not None}
    return json.dumps({"role": role, **clean}, sort_keys=True).encode()


def _prefix(request: dict[str, Any]) -> Any:
    """A hasher over the request's tools and system (the start of every block's prefix)."""
    hasher = hashlib.sha256()
    for tool in request.get("tools") or []:
        hasher.update(_canonical("tool", tool))
    system = request.get("system") or []
    for block in [{"type": "text", "text": system}] if isinstance(system, str) else system:
        hasher.update(_canonical("system", block))
    return hasher


def sign(model: str, prefix: bytes, payload: str) -> str:
    mac = hmac.new(SECRET, model.encode() + b"\0" + prefix + b"\0" + payload.encode(), "sha256")
    token = json.dumps({"m": model, "h": mac.hexdigest()}).encode()
    return base64.b64encode(token).decode()


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
    request: dict[str, Any], info: ModelInfo, drop_unbound: bool, dropped: list[dict[str, str]]
) -> None:
    """Each thinking block of the request is checked against its prefix as sent."""
    hasher = _prefix(request)
    for i, message in enumerate(request["messages"]):
        content = message.get("content")
        role = str(message.get("role"))
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for j, block in enumerate(blocks or []):
            if isinstance(block, dict) and block.get("type") in ("thinking", "redacted_thinking"):
                path = f"messages.{i}.content.{j}"
                value, text = _signed(block)
                token = _unsign(value)
                if token is None:
                    raise invalid(f"{path}: Invalid `signature` in `thinking` block")
                model, mac = token
                if model != info.id and model not in info.reads:
                    dropped.append(
                        {
                            "type": "thinking_dropped",
                            "path": path,
                            "reason": "model_binding_mismatch",
                        }
                    )
                else:
                    want = _unsign(sign(model, hasher.copy().digest(), text))
                    if want is None or not hmac.compare_digest(want[1], mac):
                        if not drop_unbound:
                            raise invalid(
                                f"{path}: Invalid `signature` in `thinking` block. The block is "
                                "bound to a different conversation. Remove the block, or set "
                                '`thinking.block_binding.prefix_mismatch_behavior` to "drop_block".'
                            )
                        dropped.append(
                            {
                                "type": "thinking_dropped",
                                "path": path,
                                "reason": "prefix_binding_mismatch",
                            }
                        )
            if isinstance(block, dict):
                hasher.update(_canonical(role, block))


# ------------------------------------------------------------------------------ replies


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
    request: dict[str, Any], checked: Checked, content: list[dict[str, Any]], digest: str
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
    hasher = _prefix(request)
    for message in request.get("messages") or []:
        body = message.get("content")
        blocks = [{"type": "text", "text": body}] if isinstance(body, str) else body
        for block in blocks or []:
            hasher.update(_canonical(str(message.get("role")), block))
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
        hasher.update(_canonical("assistant", block))
    return signed
