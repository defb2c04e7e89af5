"""The agent's prompts and limits, loaded from ``config.yaml`` (or ``KILN_AGENT_CONFIG``)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kiln_contracts import QnA

DEFAULT_PATH = Path(__file__).with_name("config.yaml")

# The most a model call that does not stream may ask for (the agent's do not): the SDK's rule,
# which its own ``messages.create`` enforces, is that a call expected to take over 10 minutes (at
# 128,000 output tokens an hour) must stream; the API itself does not refuse it, but a reply
# that outlasts the call's timeout is lost (networks drop idle connections) and retried.
NON_STREAMING_MAX_TOKENS = 21_333


class AgentConfig(BaseModel):
    """Documented field by field in config.yaml."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    system_prompt: str
    kickoff: str
    max_tokens: int = Field(default=8192, ge=1, le=NON_STREAMING_MAX_TOKENS)
    repetition_limit: int = Field(default=3, ge=2)
    model_attempts: int = Field(default=6, ge=1)
    backoff_base_s: float = Field(default=1.0, ge=0)
    backoff_cap_s: float = Field(default=30.0, ge=0)
    context_windows: dict[str, int] = Field(default_factory=dict)
    compact_at: float = Field(default=0.75, gt=0, le=1)
    keep_recent_turns: int = Field(default=8, ge=2)
    clear_over_chars: int = Field(default=2000, ge=0)
    compact_to: float = Field(default=0.5, gt=0, le=1)
    summary_max_tokens: int = Field(default=2000, ge=256, le=NON_STREAMING_MAX_TOKENS)
    summary_block_chars: int = Field(default=600, ge=80)
    summary_system: str = "You summarise a coding agent's conversation so that it can go on."
    summary_prompt: str = "Summary so far:\n{previous}\n\nTranscript:\n{transcript}"
    summary_note: str = "(Kiln) Summary of the conversation before this point:\n{summary}"
    narrate_description: str
    continued: str
    no_result: str
    forked: str = (
        "(Kiln) This build is a fork of build {source} at its iteration {iteration}: the "
        "conversation above is that build's up to there. Your sandbox is a fresh one, restored "
        "from {snapshot}: the files are as they were then, and no process is running. Go on "
        "from there. You have {iterations} iterations."
    )
    fork_no_result: str = (
        "(Kiln) No result: this build was forked at this iteration, before the call's result "
        "was recorded, so it may or may not have run. Check before relying on it."
    )

    def system(self, idea_brief: str, qna: list[QnA]) -> str:
        lines = "\n".join(f"Q: {q.question}\nA: {q.answer}" for q in qna) or "(none)"
        return self.system_prompt.format(idea_brief=idea_brief.strip(), qna=lines)

    def window(self, model: str, known: int | None) -> int:
        """The model's context window in tokens: this file's override for it (or its
        ``default``), else ``known`` (the model's entry in kiln.yaml), else 200k."""
        return (
            self.context_windows.get(model)
            or self.context_windows.get("default")
            or known
            or 200_000
        )

    def first_turn(self, build_id: str) -> str:
        return self.kickoff.format(build_id=build_id).strip()

    def continued_note(self, ended: str, iterations: int) -> str:
        snapshot = "final" if ended == "completed" else "latest"
        return self.continued.format(ended=ended, snapshot=snapshot, iterations=iterations).strip()

    def forked_note(
        self, source: str, iteration: int, snapshot_id: str | None, iterations: int
    ) -> str:
        snapshot = (
            f"snapshot {snapshot_id} of that build"
            if snapshot_id
            else "that build's newest snapshot at that iteration (an empty workspace if it had none)"
        )
        return self.forked.format(
            source=source, iteration=iteration, snapshot=snapshot, iterations=iterations
        ).strip()

    def unanswered(self, ended: str) -> str:
        return self.no_result.format(ended=ended).strip()

    @model_validator(mode="after")
    def _frees_room(self) -> AgentConfig:
        if self.compact_to >= self.compact_at:
            raise ValueError("compact_to must be below compact_at (compaction must free room)")
        return self


def load(path: str | Path | None = None) -> AgentConfig:
    source = Path(path or os.environ.get("KILN_AGENT_CONFIG") or DEFAULT_PATH)
    return AgentConfig.model_validate(yaml.safe_load(source.read_text()))
