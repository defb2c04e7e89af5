"""The HTTP API's request and response bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from kiln_contracts import BuildLimits, QnA

from .model import Build


class CreateBuild(BaseModel):
    model_config = ConfigDict(extra="forbid")

    idea_brief: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100_000)
    ] = Field(description="What to build, in the user's words (markdown).")
    understanding_qna: list[QnA] = Field(
        default_factory=list, max_length=200, description="The understanding interview."
    )
    limits: BuildLimits | None = Field(default=None, description="Per-build limits.")


class BuildOut(BaseModel):
    build_id: str
    status: str
    tier: str
    iteration: int
    cost_micro_usd: int
    last_snapshot_id: str | None
    summary: str | None
    reason: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    limits: dict[str, Any]
    idea_brief: str | None = None
    understanding_qna: list[dict[str, Any]] | None = None

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
            idea_brief=build.idea_brief if detail else None,
            understanding_qna=build.understanding_qna if detail else None,
        )


class BuildList(BaseModel):
    builds: list[BuildOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page.")


class Accepted(BaseModel):
    build_id: str
    requested: str


class Problem(BaseModel):
    detail: str
