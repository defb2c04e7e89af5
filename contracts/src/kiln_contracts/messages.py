"""Every message that crosses a service boundary, with its envelope.

This module is the only source of Kiln's wire formats. A message is a frozen pydantic model that
forbids unknown fields; its ``kind`` (a class variable, also the last token of its subject) names it.
Commands are imperative (``ToolCall``, ``SendUserMessage``, ``SleepRequested`` ...), events past
tense. It is longer than the project's other modules on purpose: the catalogue of messages is
read as one list, in the order a build meets them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints, model_validator

SCHEMA_VERSION: Literal[1] = 1

# Ids that become subject tokens: no dots, wildcards or spaces.
Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
MicroUsd = Annotated[int, Field(ge=0, description="An amount of US dollars x 1,000,000.")]

ToolName = Literal[
    "read_file",
    "write_file",
    "edit_file",
    "bash",
    "bash_output",
    "kill_shell",
    "glob",
    "grep",
    "list_dir",
]
ProcessEnd = Literal["exited", "killed", "stopped", "lost"]
# "fork": a fork's first snapshot, a copy of its source's (no CheckpointSaved has this reason)
CheckpointReason = Literal["files_changed", "sleep", "final", "fork"]
FailureReason = Literal[
    "iteration_limit",
    "cost_limit",
    "budget",
    "repetition",
    "model_error",
    "model_refusal",
    "context_window",
    "stalled",
    "internal",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Envelope(Model):
    """Fields every message carries."""

    kind: ClassVar[str] = ""

    event_id: uuid.UUID = Field(
        default_factory=uuid.uuid4,
        description="Unique per message; also sent as the Nats-Msg-Id header (dedup).",
    )
    build_id: Id
    user_id: Id
    occurred_at: datetime = Field(default_factory=utcnow)
    schema_version: Literal[1] = SCHEMA_VERSION
    causation_id: uuid.UUID | None = Field(
        default=None, description="The event_id of the message that caused this one."
    )

    def caused(self, cls: type[M], /, **fields: Any) -> M:
        """A message of type ``cls`` caused by this one, for the same build and user."""
        fields.setdefault("build_id", self.build_id)
        fields.setdefault("user_id", self.user_id)
        return cls(causation_id=self.event_id, **fields)

    def with_id(self, event_id: uuid.UUID) -> Self:
        return self.model_copy(update={"event_id": event_id})


M = TypeVar("M", bound=Envelope)


# ---------------------------------------------------------------------------- value objects


class QnA(Model):
    question: Annotated[str, StringConstraints(min_length=1, max_length=4_000)]
    answer: Annotated[str, StringConstraints(max_length=20_000)]


class BuildLimits(Model):
    max_iterations: int = Field(default=50, ge=1, le=10_000)
    max_cost_micro_usd: MicroUsd | None = Field(
        default=None, description="Per-build cost cap; None means the tier's cap."
    )
    tool_timeout_s: float = Field(default=120.0, gt=0, le=3_600)


class CacheCreation(Model):
    """Cache writes by TTL, as the Messages API reports them (their sum is
    ``cache_creation_input_tokens``)."""

    ephemeral_5m_input_tokens: int = Field(default=0, ge=0)
    ephemeral_1h_input_tokens: int = Field(default=0, ge=0)


class Usage(Model):
    """A model call's token usage, as the Messages API reports it: ``input_tokens`` excludes the
    cache reads and writes (the prompt is the sum of the three)."""

    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    cache_creation_input_tokens: int = Field(default=0, ge=0)
    cache_read_input_tokens: int = Field(default=0, ge=0)
    cache_creation: CacheCreation | None = None


class ForkOrigin(Model):
    """Where a forked build starts from: another build of the same user, at one of its
    iterations. Its conversation is the source's up to ``iteration`` (every turn recorded while
    the source was at that iteration or before); its files are the source's snapshot
    ``snapshot_id``, the newest one the source took at ``iteration`` or before."""

    build_id: Id = Field(description="The source build (the same user's).")
    iteration: int = Field(ge=0, le=1_000_000, description="The source's iteration to fork at.")
    snapshot_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9-]{1,64}$")] | None = Field(
        default=None,
        description="The source's snapshot of that iteration. None: the newest snapshot of the "
        "source with an iteration <= ``iteration`` (found when the fork's sandbox is made); no "
        "such snapshot: the fork starts with an empty workspace.",
    )


# ---------------------------------------------------------------------------- messages


class BuildRequested(Envelope):
    """Start a build. With ``fork``, the build is a fork of another build of the same user: its
    conversation and files are the source's at that iteration (``idea_brief`` and ``tier`` are
    the source's too, as the gateway fills them; the agent uses the source's system prompt)."""

    kind: ClassVar[str] = "build_requested"

    tier: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")] = "free"
    idea_brief: Annotated[str, StringConstraints(min_length=1, max_length=100_000)]
    understanding_qna: list[QnA] = Field(default_factory=list, max_length=200)
    limits: BuildLimits = Field(default_factory=BuildLimits)
    fork: ForkOrigin | None = Field(
        default=None, description="Fork another build at one of its iterations (see ForkOrigin)."
    )


class ToolCall(Envelope):
    kind: ClassVar[str] = "tool_call"

    call_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    iteration: int = Field(ge=1)
    tool: ToolName
    input: dict[str, JsonValue]
    timeout_s: float = Field(default=120.0, gt=0, le=3_600)
    restore_from: ForkOrigin | None = Field(
        default=None,
        description="The build is a fork: a sandbox made for it while it has no snapshot of its "
        "own is restored from this one of its source build.",
    )


class ToolResult(Envelope):
    kind: ClassVar[str] = "tool_result"

    call_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    iteration: int = Field(ge=1)
    output: str = Field(description="Tool output, already truncated by the sandbox.")
    is_error: bool = False
    exit_code: int | None = None
    duration_ms: int = Field(default=0, ge=0)
    files_changed: list[str] = Field(default_factory=list)


class IterationCompleted(Envelope):
    kind: ClassVar[str] = "iteration_completed"

    iteration: int = Field(ge=1)
    model: str
    usage: Usage
    stop_reason: str
    cost_micro_usd: MicroUsd = Field(
        default=0, description="The agent's own estimate; the budget service prices usage itself."
    )
    purpose: Literal["turn", "summary"] = Field(
        default="turn",
        description="turn: the iteration's model call; summary: a call that summarised the "
        "oldest part of the conversation to fit the context window, made before the next turn "
        "of `iteration` (charged the same way; it does not count as an iteration).",
    )


class CheckpointSaved(Envelope):
    kind: ClassVar[str] = "checkpoint_saved"

    iteration: int = Field(ge=0)
    reason: CheckpointReason


class SnapshotSaved(Envelope):
    kind: ClassVar[str] = "snapshot_saved"

    snapshot_id: str
    iteration: int = Field(ge=0)
    reason: CheckpointReason
    files: int = Field(ge=0)
    bytes_total: int = Field(ge=0)
    bytes_uploaded: int = Field(ge=0)


class SleepRequested(Envelope):
    kind: ClassVar[str] = "sleep_requested"

    reason: str
    wake_at: datetime | None = None


class WakeRequested(Envelope):
    kind: ClassVar[str] = "wake_requested"

    reason: str


class CancelRequested(Envelope):
    kind: ClassVar[str] = "cancel_requested"

    reason: str = "cancelled by user"


class TopUpRequested(Envelope):
    """Credit a user's budget now (a command to the budget service, which applies a ``topup_id``
    once and wakes the builds it put to sleep). About a user, not a build: ``build_id`` is the
    user's budget token ``budget-<hex>`` (``budget_id(user_id)``), so a user's top-ups share one
    subject that no build has; ``TopUpRequested.of`` fills it and the stable event id in."""

    kind: ClassVar[str] = "top_up_requested"

    topup_id: Id = Field(description="The same top-up id again (for the user) is the same top-up.")
    amount_micro_usd: int = Field(gt=0, le=10**12, description="US dollars x 1,000,000.")

    @classmethod
    def of(cls, user_id: str, topup_id: str, amount_micro_usd: int) -> TopUpRequested:
        return cls(
            event_id=stable_id("top-up", user_id, topup_id),
            build_id=budget_id(user_id),
            user_id=user_id,
            topup_id=topup_id,
            amount_micro_usd=amount_micro_usd,
        )

    @model_validator(mode="after")
    def _on_the_users_budget_subject(self) -> Self:
        if self.build_id != budget_id(self.user_id):
            raise ValueError(
                f"a top-up's build_id is budget_id(user_id) = {budget_id(self.user_id)}"
            )
        return self


class SendUserMessage(Envelope):
    """A user's message to a build (a command to the agent). A running build reads it at its next
    think, a sleeping one when it wakes; a completed, failed or cancelled one continues with it.
    The agent takes a build's messages in ``seq`` order, each once: a ``seq`` it has taken is a
    duplicate, one past the next it expects waits for the ones before it. The gateway numbers the
    messages sent through it; another producer that numbers its own must be the build's only
    sender. ``SendUserMessage.of`` fills in the stable event id."""

    kind: ClassVar[str] = "send_user_message"

    message_id: Id = Field(description="The message's id; the same id is the same message.")
    seq: int = Field(
        ge=1, le=1_000_000, description="Its number among the build's messages: 1, 2, 3 ..."
    )
    text: Annotated[str, StringConstraints(min_length=1, max_length=20_000)]

    @classmethod
    def of(
        cls, build_id: str, user_id: str, message_id: str, seq: int, text: str, **fields: Any
    ) -> SendUserMessage:
        return cls(
            event_id=stable_id(build_id, "user_message", message_id),
            build_id=build_id,
            user_id=user_id,
            message_id=message_id,
            seq=seq,
            text=text,
            **fields,
        )


class BuildContinued(Envelope):
    """A completed, failed or cancelled build runs again, with a user's message: its whole
    conversation kept, its files restored from its latest snapshot into a fresh sandbox, its
    limits (iterations, per-build cost cap) a new allowance. ``iterations`` and
    ``cost_micro_usd`` are the totals so far: the new iterations are numbered on from there."""

    kind: ClassVar[str] = "build_continued"

    continuation: int = Field(ge=1, description="1 for the build's first continuation, then 2 ...")
    after: Literal["completed", "failed", "cancelled"] = Field(
        description="How the run it continues ended."
    )
    message_id: Id = Field(description="The user message that continued it.")
    iterations: int = Field(ge=0)
    cost_micro_usd: MicroUsd


class BuildSleeping(Envelope):
    kind: ClassVar[str] = "build_sleeping"

    reason: str
    wake_at: datetime | None = None


class BuildResumed(Envelope):
    kind: ClassVar[str] = "build_resumed"

    reason: str


class AgentNarrated(Envelope):
    kind: ClassVar[str] = "agent_narrated"

    iteration: int = Field(ge=0)
    text: Annotated[str, StringConstraints(max_length=20_000)]
    source: Literal["narrate", "thinking"] = Field(
        default="narrate",
        description="narrate: the model's narrate tool; thinking: the progress it wrote in its "
        "(summarized) thinking and before its tool calls in one iteration.",
    )


class SandboxStarted(Envelope):
    kind: ClassVar[str] = "sandbox_started"

    sandbox_id: str
    provider: str
    from_snapshot: str | None = None


class SandboxRestored(Envelope):
    kind: ClassVar[str] = "sandbox_restored"

    sandbox_id: str
    provider: str
    from_snapshot: str | None = None


class SandboxStopped(Envelope):
    kind: ClassVar[str] = "sandbox_stopped"

    sandbox_id: str
    provider: str
    reason: str


class ProcessStarted(Envelope):
    """A background process (``bash`` with ``run_in_background``) started in the build's sandbox."""

    kind: ClassVar[str] = "process_started"

    process_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    call_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    iteration: int = Field(ge=1)
    command: Annotated[str, StringConstraints(max_length=2_000)] = Field(
        description="The command as the model gave it (cut at 2,000 characters)."
    )
    sandbox_id: str
    pid: int | None = Field(
        default=None,
        description="The process's id inside the sandbox; it leads its own process group and "
        "session, so whatever it starts (and the ports those listen on) can be found by it.",
    )


class ProcessExited(Envelope):
    """A background process is no longer running: it ``exited`` by itself (seen by
    ``bash_output`` or when the sandbox stopped), was ``killed`` by the model (``kill_shell``),
    ``stopped`` by the platform (sleep, cancel, the build's end), or ``lost`` with a sandbox that
    went away (the build continues in a fresh one)."""

    kind: ClassVar[str] = "process_exited"

    process_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    how: ProcessEnd
    exit_code: int | None = None
    reason: str = ""


class PreviewAvailable(Envelope):
    """A background process of the build listens on a TCP port: the running app can be looked
    at. Provider ``e2b``: ``url`` is the sandbox's public host for the port (E2B's
    ``get_host``); where the sandbox's traffic is private, ``traffic_access_token`` goes in the
    ``e2b-traffic-access-token`` header. Provider ``local``: ``url`` is the gateway's proxy path
    for the port (``/v1/builds/<id>/preview/<port>/``, the gateway's own address before it), open
    to the build's owner only."""

    kind: ClassVar[str] = "preview_available"

    process_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    port: int = Field(ge=1, le=65535)
    provider: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    sandbox_id: str
    url: Annotated[str, StringConstraints(min_length=1, max_length=2_000)]
    traffic_access_token: str | None = Field(
        default=None,
        description="E2B's token for a sandbox whose traffic is private (header "
        "e2b-traffic-access-token); none when its ports are public or on the local provider.",
    )


class PreviewGone(Envelope):
    """A preview is no longer there: its process stopped listening on the port, ended, was
    stopped (sleep, cancel, the build's end) or was lost with its sandbox."""

    kind: ClassVar[str] = "preview_gone"

    process_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    port: int = Field(ge=1, le=65535)
    reason: str = ""


class BuildCompleted(Envelope):
    kind: ClassVar[str] = "build_completed"

    summary: str
    iterations: int = Field(ge=0)
    cost_micro_usd: MicroUsd
    final_checkpoint_id: uuid.UUID | None = Field(
        default=None, description="event_id of the final CheckpointSaved; its snapshot_id."
    )
    continuation: int = Field(
        default=0, ge=0, description="The run it ends: 0 the first, k its k-th continuation."
    )


class BuildFailed(Envelope):
    kind: ClassVar[str] = "build_failed"

    reason: FailureReason
    detail: str = ""
    iterations: int = Field(ge=0)
    cost_micro_usd: MicroUsd
    continuation: int = Field(
        default=0, ge=0, description="The run it ends: 0 the first, k its k-th continuation."
    )


class BuildCancelled(Envelope):
    kind: ClassVar[str] = "build_cancelled"

    reason: str
    iterations: int = Field(ge=0)
    cost_micro_usd: MicroUsd
    continuation: int = Field(
        default=0, ge=0, description="The run it ends: 0 the first, k its k-th continuation."
    )


class BuildRejected(Envelope):
    """The agent did not start the build: its user's budget gate was closed (the allowance is
    used up). An ending: the build never ran, cost nothing and never will."""

    kind: ClassVar[str] = "build_rejected"

    reason: str = Field(description="What is spent, when the allowance resets, how to top up.")
    spent_micro_usd: MicroUsd = Field(description="The user's spend in the allowance period.")
    allowance_micro_usd: MicroUsd = Field(description="The period's allowance.")
    resets_at: datetime = Field(description="When the allowance resets (the gate opens).")


MESSAGES: tuple[type[Envelope], ...] = (
    BuildRequested,
    ToolCall,
    ToolResult,
    IterationCompleted,
    CheckpointSaved,
    SnapshotSaved,
    SleepRequested,
    WakeRequested,
    CancelRequested,
    TopUpRequested,
    SendUserMessage,
    BuildContinued,
    BuildSleeping,
    BuildResumed,
    AgentNarrated,
    SandboxStarted,
    SandboxRestored,
    SandboxStopped,
    ProcessStarted,
    ProcessExited,
    PreviewAvailable,
    PreviewGone,
    BuildCompleted,
    BuildFailed,
    BuildCancelled,
    BuildRejected,
)
BY_KIND: dict[str, type[Envelope]] = {m.kind: m for m in MESSAGES}
TERMINAL_KINDS = frozenset(
    {BuildCompleted.kind, BuildFailed.kind, BuildCancelled.kind, BuildRejected.kind}
)

# A model call's id from Anthropic becomes a call_id; ids derived from it must be stable so that a
# republish after a crash carries the same event_id (and is dropped by the server as a duplicate).
_NAMESPACE = uuid.UUID("5d1c8f0e-4a43-4a8e-9a86-0c9b1f3a6e11")


def stable_id(*parts: object) -> uuid.UUID:
    """A deterministic event id from its parts (build id, kind, iteration, call id ...)."""
    return uuid.uuid5(_NAMESPACE, "/".join(str(p) for p in parts))


def budget_id(user_id: str) -> str:
    """The ``build_id`` of a user's budget commands (``budget-`` + 32 hex digits): the subject
    token ``kiln.build.budget-<hex>.<kind>`` of a user, which no build id the gateway makes has."""
    return f"budget-{stable_id('budget', user_id).hex}"
