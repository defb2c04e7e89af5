"""The builds API's request and response bodies: builds, forks, messages, processes and
previews, stream tokens."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from kiln_contracts import BuildLimits, QnA

from .model import Build, Message
from .previews import previews_of
from .schemas import BRIEF_EXAMPLE, QNA_EXAMPLE, Body, Brief, Ident
from .waiting import of as waiting_of


class CreateBuild(Body):
    """Either an idea brief (and Q&A) inline, or a project (and optionally one of its versions)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "idea_brief": BRIEF_EXAMPLE,
                    "understanding_qna": QNA_EXAMPLE,
                    "limits": {"max_iterations": 40},
                },
                {"project_id": "3f2c9a7e5b8d4c1e9f0a1b2c3d4e5f60", "project_version": 2},
            ]
        },
    )

    idea_brief: Brief | None = Field(
        default=None, description="What to build, in the user's words (markdown)."
    )
    understanding_qna: list[QnA] | None = Field(
        default=None, max_length=200, description="The understanding interview."
    )
    project_id: Ident | None = Field(
        default=None, description="Build this project's brief and Q&A instead of inline ones."
    )
    project_version: int | None = Field(
        default=None, ge=1, description="The project's version (default: its latest)."
    )
    limits: BuildLimits | None = Field(default=None, description="Per-build limits.")

    @model_validator(mode="after")
    def _one_source(self) -> CreateBuild:
        if self.project_id is None:
            if self.idea_brief is None:
                raise ValueError("give idea_brief (and understanding_qna) or project_id")
            if self.project_version is not None:
                raise ValueError("project_version needs project_id")
        elif self.idea_brief is not None or self.understanding_qna is not None:
            raise ValueError("give either project_id or idea_brief/understanding_qna, not both")
        return self


class ForkedFrom(BaseModel):
    build_id: str
    iteration: int
    snapshot_id: str | None = Field(
        description="The source's snapshot the fork's files are; null: it had none by then."
    )


class ForkBuild(BaseModel):
    """Fork a build: at an iteration, or at one of its snapshots (exactly one of the two)."""

    model_config = ConfigDict(extra="forbid")

    iteration: int | None = Field(
        default=None,
        ge=0,
        le=1_000_000,
        description="Fork at this iteration: its conversation up to there, and the newest "
        "snapshot taken at that iteration or before.",
    )
    snapshot_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="Fork at this snapshot of the build (at the iteration it was taken).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ForkBuild:
        if (self.iteration is None) == (self.snapshot_id is None):
            raise ValueError("give exactly one of iteration and snapshot_id")
        return self


class ProcessOut(BaseModel):
    """A background process of the build's sandbox (``bash`` with ``run_in_background``)."""

    process_id: str = Field(examples=["bash_1"])
    status: str = Field(
        description="running, exited (by itself), killed (by the model), stopped (sleep, "
        "cancel or the build's end) or lost (with a sandbox that went away)"
    )
    command: str | None = None
    pid: int | None = None
    exit_code: int | None = None
    reason: str | None = None
    sandbox_id: str | None = None


class PreviewOut(BaseModel):
    """A port a process of the build's sandbox listens on: the running app."""

    port: int = Field(examples=[8000])
    status: str = Field(
        description="available, or gone (no longer listening, its process ended, the build "
        "sleeping or ended; ``reason`` says which)"
    )
    url: str = Field(
        description="e2b: the sandbox's host for the port; local: the gateway's proxy path "
        "(/v1/builds/{id}/preview/{port}/), which needs a preview token (POST "
        ".../preview/token) or the API key",
        examples=["/v1/builds/b_1/preview/8000/"],
    )
    provider: str
    process_id: str
    reason: str | None = None
    traffic_access_token: str | None = Field(
        default=None,
        description="e2b, private traffic: send it in the e2b-traffic-access-token header.",
    )


class PreviewToken(BaseModel):
    token: str
    expires_at: int = Field(description="Unix time the token stops working.")
    url_prefix: str = Field(
        description="The frame's address for a port: url_prefix + port + '/' (the token is in "
        "the path, so the app's relative links keep it).",
        examples=["/v1/builds/b_1/preview/t/<token>/"],
    )


class WaitingOn(BaseModel):
    service: Literal["agent", "sandbox", "budget", "snapshot"] = Field(
        description="agent: its model call; sandbox: the tool calls named; budget: the "
        "allowance (asleep); snapshot: the final snapshot of a completed build."
    )
    what: str = Field(examples=["tool call bash (toolu_01)"])
    since: datetime
    seconds: float = Field(description="How long, when this answer was made.")

    @classmethod
    def of(cls, waiting: str) -> WaitingOn | None:
        found = waiting_of(waiting, datetime.now(UTC))
        return None if found is None else cls.model_validate(found)


class BuildOut(BaseModel):
    build_id: str
    status: str = Field(
        description="queued, running, sleeping, completed, failed, cancelled or rejected "
        "(not started: the allowance was used up; ``reason`` says so)",
        examples=["running"],
    )
    tier: str
    iteration: int
    cost_micro_usd: int = Field(description="Spent so far, in millionths of a US dollar.")
    last_snapshot_id: str | None
    summary: str | None
    reason: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    limits: dict[str, Any]
    project_id: str | None = None
    project_version: int | None = None
    idea_brief: str | None = None
    understanding_qna: list[dict[str, Any]] | None = None
    continuations: int = Field(
        default=0,
        description="How many times the build has continued after it ended (a message to a "
        "completed, failed or cancelled build continues it).",
    )
    forked_from: ForkedFrom | None = Field(
        default=None, description="A fork: the build, iteration and snapshot it started from."
    )
    processes: list[ProcessOut] = Field(
        default_factory=list,
        description="The build's background processes, oldest first (GET /v1/builds/{id} only).",
    )
    previews: list[PreviewOut] = Field(
        default_factory=list,
        description="The build's previews, one per port (GET /v1/builds/{id} only).",
    )
    waiting_on: WaitingOn | None = Field(
        default=None,
        description="What the build is waiting on now: the service that has to act next, on "
        "what, since when (none: nothing, e.g. an ended build whose files are stored).",
    )

    @classmethod
    def of(cls, build: Build, *, detail: bool = True) -> BuildOut:
        s = build.state
        return cls(
            build_id=build.build_id,
            status=s.status,
            tier=build.tier,
            iteration=s.iteration,
            cost_micro_usd=s.cost_micro_usd,
            last_snapshot_id=s.last_snapshot_id,
            summary=s.summary,
            reason=s.reason,
            created_at=build.created_at,
            updated_at=build.updated_at,
            finished_at=s.finished_at,
            limits=build.limits,
            project_id=build.project_id,
            project_version=build.project_version,
            idea_brief=build.idea_brief if detail else None,
            understanding_qna=build.understanding_qna if detail else None,
            continuations=s.continuations,
            forked_from=(
                ForkedFrom(
                    build_id=build.fork_of,
                    iteration=build.fork_iteration or 0,
                    snapshot_id=build.fork_snapshot_id,
                )
                if build.fork_of
                else None
            ),
            processes=[ProcessOut.model_validate(p) for p in json.loads(s.processes)]
            if detail
            else [],
            previews=[
                PreviewOut(
                    port=p.port,
                    status=p.status,
                    url=p.url,
                    provider=p.provider,
                    process_id=p.process_id,
                    reason=p.reason,
                    traffic_access_token=p.traffic_access_token,
                )
                for p in previews_of(build)
            ]
            if detail
            else [],
            waiting_on=WaitingOn.of(s.waiting),
        )


class BuildList(BaseModel):
    builds: list[BuildOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page.")


class Accepted(BaseModel):
    build_id: str
    requested: str = Field(examples=["wake"])


class SendMessage(Body):
    """A message to a build, in the user's words."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"text": "Add a --json flag to the command line tool."}]},
    )

    text: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=20_000)
    ] = Field(description="What to tell the build (plain text or markdown).")


class MessageOut(BaseModel):
    message_id: str
    build_id: str
    seq: int = Field(description="The message's number among the build's messages: 1, 2, ...")
    created_at: datetime

    @classmethod
    def of(cls, m: Message) -> MessageOut:
        return cls(message_id=m.message_id, build_id=m.build_id, seq=m.seq, created_at=m.created_at)


class StreamToken(BaseModel):
    token: str = Field(description="Pass as ?token= to this build's events endpoint.")
    expires_at: int = Field(description="Unix time.")
    events_url: str
