"""The projects API's request and response bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kiln_contracts import QnA

from .model import Project
from .schemas import BRIEF_EXAMPLE, QNA_EXAMPLE, Body, Brief, Name


class CreateProject(Body):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "textstats", "idea_brief": BRIEF_EXAMPLE, "understanding_qna": QNA_EXAMPLE}
            ]
        },
    )

    name: Name = "untitled"
    idea_brief: Brief
    understanding_qna: list[QnA] = Field(default_factory=list, max_length=200)


class EditProject(Body):
    """PATCH: the fields to change (others are kept). PUT: the whole project."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"understanding_qna": QNA_EXAMPLE, "base_version": 1},
            ]
        },
    )

    name: Name | None = None
    idea_brief: Brief | None = None
    understanding_qna: list[QnA] | None = Field(default=None, max_length=200)
    base_version: int | None = Field(
        default=None,
        ge=1,
        description="Refuse (409) unless this is still the latest version (optimistic locking).",
    )


class ReplaceProject(CreateProject):
    model_config = ConfigDict(extra="forbid")

    base_version: int | None = Field(default=None, ge=1)


class ProjectOut(BaseModel):
    project_id: str
    name: str
    version: int
    latest_version: int
    idea_brief: str | None = None
    understanding_qna: list[dict[str, Any]] | None = None
    created_at: datetime
    updated_at: datetime = Field(description="When this version was made.")

    @classmethod
    def of(cls, p: Project, *, detail: bool = True) -> ProjectOut:
        return cls(
            project_id=p.project_id,
            name=p.name,
            version=p.version,
            latest_version=p.latest_version,
            idea_brief=p.idea_brief if detail else None,
            understanding_qna=p.understanding_qna if detail else None,
            created_at=p.created_at,
            updated_at=p.updated_at,
        )


class ProjectList(BaseModel):
    projects: list[ProjectOut]
    next_cursor: str | None = None
