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

The catalogue of models is in ``catalogue``, the signing and checking of thinking blocks in
``thinking``; this module checks a request against the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .catalogue import EFFORTS, ModelInfo, invalid, lookup
from .prompt import parts
from .thinking import Issued, verify_thinking

BINDING_BETA = "thinking-binding-controls-2026-08-01"


@dataclass
class Checked:
    """A request that passed the rules: the model, whether it thinks and shows its thinking."""

    info: ModelInfo
    thinking: bool
    summarized: bool
    tokens: int  # the prompt's (``prompt_tokens``)
    prefix: Any  # a hasher over the whole prompt: the prefix the reply's blocks are signed on
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
    prompt = parts(request)
    dropped: list[dict[str, str]] = []
    prefix = verify_thinking(prompt, info, drop_unbound, dropped)
    issued.check_latest(messages, {d["path"] for d in dropped})
    return Checked(info, thinking, summarized, sum(p.tokens for p in prompt), prefix, dropped)


def prompt_tokens(request: dict[str, Any]) -> int:
    """The prompt's tokens as the scripted model counts them (a quarter of the characters of each
    tool, system block and message block's JSON, cache_control aside), as its usage reports them."""
    return sum(p.tokens for p in parts(request))


def check_length(tokens: int, window: int) -> None:
    """A prompt longer than the context window is refused before anything runs."""
    if tokens > window:
        raise invalid(f"prompt is too long: {tokens} tokens > {window} maximum")


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
