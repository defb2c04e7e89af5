"""A build's checkpoint: the small row the state machine advances (the turns are stored apart)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from kiln_contracts import BY_KIND, BuildLimits, Envelope, ForkOrigin

Status = Literal["thinking", "acting", "sleeping", "completed", "failed", "cancelled", "rejected"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled", "rejected"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PendingCall(_Model):
    """One tool_use block of the current iteration, in the order the model wrote them."""

    call_id: str
    tool: str
    input: dict[str, JsonValue]


class Outcome(_Model):
    """The result of a pending call, as the model will see it."""

    content: str
    is_error: bool = False
    files_changed: list[str] = Field(default_factory=list)


class SleepRequest(_Model):
    reason: str
    wake_at: datetime | None = None


class Waiting(_Model):
    """A user message taken but not yet placed in the conversation."""

    message_id: str
    seq: int
    text: str


class Stall(_Model):
    """The watchdog's retries of a build that stopped moving, valid while the row stays at
    ``version`` (the one the last retry saved): any other change is progress, and starts over."""

    version: int
    retries: int


class State(_Model):
    """The jsonb part of the row: bounded in size, whatever the conversation's length."""

    pending: list[PendingCall] = Field(default_factory=list)
    results: dict[str, Outcome] = Field(default_factory=dict)
    sleep: SleepRequest | None = Field(
        default=None, description="A sleep requested while calls were in flight."
    )
    sleeps: int = Field(default=0, description="How many times the build went to sleep.")
    streak_call: str | None = Field(default=None, description="The last call's signature.")
    streak: int = Field(default=0, description="How many times in a row it was made.")
    detail: str = ""
    compacted_before: int = Field(
        default=0, description="Turns before this seq are sent with long tool output cleared."
    )
    summarised_before: int = Field(
        default=0, description="Turns 1 to this seq (excluded) are sent as `summary`."
    )
    summary: str | None = Field(default=None, description="The summary of those turns.")
    summaries: int = Field(default=0, description="How many summarising calls were charged.")
    context_tokens: int | None = Field(
        default=None, description="Tokens of the last call (input + cache + output) per the API."
    )
    context_turns: int = Field(default=0, description="The turns that count covers.")
    compact_now: bool = Field(default=False, description="The last call overflowed the window.")
    effort: str | None = Field(
        default=None, description="output_config.effort of every call (constant per model)."
    )
    messages: int = Field(default=0, description="The seq of the last user message taken.")
    inbox: list[Waiting] = Field(
        default_factory=list,
        description="User messages taken but not yet placed in the conversation, in order.",
    )
    continuations: int = Field(default=0, description="How many times the build continued.")
    run_iteration: int = Field(
        default=0, description="The iteration the current run started from (its allowance)."
    )
    run_cost_micro_usd: int = Field(default=0, description="The cost when the run started.")
    stall: Stall | None = Field(
        default=None, description="The watchdog's retries since the build last moved."
    )
    fork: ForkOrigin | None = Field(
        default=None,
        description="The build is a fork of this build, iteration and snapshot (its ToolCalls "
        "carry it: a sandbox made for it before it has a snapshot of its own restores from it).",
    )


@dataclass
class Checkpoint:
    build_id: str
    user_id: str
    tier: str
    model: str
    limits: BuildLimits
    system: str
    status: Status = "thinking"
    iteration: int = 0
    cost_micro_usd: int = 0
    state: State = field(default_factory=State)
    version: int = 0
    turns: int = 0
    outbox: list[Envelope] = field(default_factory=list)
    lease: str | None = None
    """The token under which this replica holds the build's think lease, if the read or save
    that gave this checkpoint took it (not stored)."""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class Turn:
    seq: int
    role: Literal["user", "assistant"]
    content: list[dict[str, Any]]
    iteration: int | None = None
    """The build's iteration when the turn was recorded (an assistant turn: the iteration its
    reply made; None: recorded before turns kept it). A fork at iteration N keeps the turns of
    iterations <= N."""
    stored: str | None = field(default=None, repr=False, compare=False)
    """The content's JSON as the store holds it (a turn read back from the store)."""

    @cached_property
    def content_json(self) -> str:
        """The content as JSON, encoded once: what the store writes, what the turn cache and the
        context's estimate count, and what a request sending the turn unchanged carries."""
        return self.stored if self.stored is not None else json.dumps(self.content)

    @cached_property
    def derived(self) -> dict[Any, Any]:
        """Forms of the turn that code derives from it and keeps with it (the context's cleared
        message): the turn never changes, so neither do they."""
        return {}

    @cached_property
    def message(self) -> Verbatim:
        """The turn as a request message, sent as it is (never changed: a message that differs
        is a new dict)."""
        return Verbatim(self.role, self.content, self.content_json)


class Verbatim(dict[str, Any]):
    """A request message ``{"role", "content"}`` made once and sent the same at every call (a
    turn as it is, or as cleared), with its JSON as ``json.dumps`` writes the message (from the
    content's JSON when it is known): a request's body is joined from the messages' JSON, so a
    conversation is not encoded again at every call."""

    __slots__ = ("json",)

    def __init__(
        self, role: str, content: list[dict[str, Any]], content_json: str | None = None
    ) -> None:
        super().__init__(role=role, content=content)
        text = json.dumps(content) if content_json is None else content_json
        self.json = f'{{"role": {json.dumps(role)}, "content": {text}}}'.encode()


def dump_outbox(outbox: list[Envelope]) -> list[dict[str, Any]]:
    return [{"kind": m.kind, "message": m.model_dump(mode="json")} for m in outbox]


def load_outbox(raw: list[dict[str, Any]]) -> list[Envelope]:
    return [BY_KIND[item["kind"]].model_validate(item["message"]) for item in raw]
