"""What the HTTP API's bodies share: the request base (no NUL characters), the constrained
strings, the examples shown in the OpenAPI docs, and the problem document of every error.

The bodies themselves: ``schemas_builds``, ``schemas_projects``, ``schemas_accounts``,
``schemas_snapshots``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

Brief = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100_000)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Ident = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]

QNA_EXAMPLE: Any = [
    {"question": "Which Python version?", "answer": "3.11, standard library only"},
    {"question": "How should it be tested?", "answer": "unittest"},
]
BRIEF_EXAMPLE = "A tiny Python package `textstats` that counts words, lines and characters."


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


class Body(BaseModel):
    """A request body: no NUL characters in text (JSON allows "\\u0000"; Postgres text cannot
    hold it)."""

    @model_validator(mode="after")
    def _no_nul(self) -> Body:
        if _has_nul(self.model_dump()):
            raise ValueError("text must not contain NUL characters (\\u0000)")
        return self


class Problem(BaseModel):
    """An error, as RFC 9457 problem details (``application/problem+json``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "https://kiln.dev/problems/not-found",
                    "title": "Not Found",
                    "status": 404,
                    "detail": "build not found",
                    "instance": "/v1/builds/0123456789abcdef",
                }
            ]
        }
    )

    type: str = "about:blank"
    title: str = ""
    status: int = 0
    detail: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="For 422: each invalid field."
    )
    spent_micro_usd: int | None = Field(
        default=None, description="allowance-used-up: the spend in the allowance period."
    )
    allowance_micro_usd: int | None = Field(
        default=None, description="allowance-used-up: the period's allowance."
    )
    resets_at: datetime | None = Field(
        default=None, description="allowance-used-up: when the allowance resets (UTC)."
    )
    top_up: str | None = Field(default=None, description="allowance-used-up: how to top up.")
