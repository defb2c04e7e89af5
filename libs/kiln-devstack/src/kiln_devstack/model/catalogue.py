"""The scripted model server's model catalogue (current, legacy and retired models, their
aliases and limits, modelled on the Claude platform docs' models overview) and the API's error
shape. The rules it serves under: ``rules``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
