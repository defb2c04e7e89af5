"""The gateway's rows in Postgres as its model's objects, and the columns and statuses the
statements name."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from ..model import TERMINAL, ApiKey, Build, Message, Project, Projection

PROJECT_SELECT = """
SELECT p.project_id, p.user_id, p.latest_version, p.created_at, v.version, v.name,
       v.idea_brief, v.understanding_qna, v.created_at AS updated_at
FROM projects p JOIN project_versions v ON v.project_id = p.project_id
"""

PROJECTION_COLUMNS = tuple(Projection.__dataclass_fields__)
TERMINAL_STATUSES = sorted(TERMINAL)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def _of_row(cls: type[T], row: asyncpg.Record, **given: Any) -> T:
    """A ``cls`` of the row's columns named as its fields, but for the fields ``given``."""
    taken = {f.name: row[f.name] for f in fields(cls) if f.name not in given}
    return cls(**taken, **given)


def project_of(row: asyncpg.Record) -> Project:
    return _of_row(Project, row, understanding_qna=json.loads(row["understanding_qna"]))


def key_of(row: asyncpg.Record) -> ApiKey:
    return _of_row(
        ApiKey,
        row,
        key_id=row["key_id"] or row["key_sha256"][:16],
        key_prefix=row["key_prefix"] or "",
    )


def message_of(row: asyncpg.Record) -> Message:
    return _of_row(Message, row)


def build_of(row: asyncpg.Record) -> Build:
    return _of_row(
        Build,
        row,
        understanding_qna=json.loads(row["understanding_qna"]),
        limits=json.loads(row["limits"]),
        state=Projection(**{k: row[k] for k in PROJECTION_COLUMNS}),
    )
