"""The gateway's rows in Postgres as its model's objects, and the columns and statuses the
statements name."""

from __future__ import annotations

import json

import asyncpg

from ..model import TERMINAL, ApiKey, Build, Message, Project, Projection

PROJECT_SELECT = """
SELECT p.project_id, p.user_id, p.latest_version, p.created_at, v.version, v.name,
       v.idea_brief, v.understanding_qna, v.created_at AS updated_at
FROM projects p JOIN project_versions v ON v.project_id = p.project_id
"""

PROJECTION_COLUMNS = tuple(Projection.__dataclass_fields__)
TERMINAL_STATUSES = sorted(TERMINAL)


def project_of(row: asyncpg.Record) -> Project:
    return Project(
        project_id=row["project_id"],
        user_id=row["user_id"],
        name=row["name"],
        version=row["version"],
        latest_version=row["latest_version"],
        idea_brief=row["idea_brief"],
        understanding_qna=json.loads(row["understanding_qna"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def key_of(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        key_id=row["key_id"] or row["key_sha256"][:16],
        key_prefix=row["key_prefix"] or "",
        user_id=row["user_id"],
        tier=row["tier"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


def message_of(row: asyncpg.Record) -> Message:
    return Message(
        message_id=row["message_id"],
        build_id=row["build_id"],
        user_id=row["user_id"],
        seq=row["seq"],
        text=row["text"],
        request_sha256=row["request_sha256"],
        created_at=row["created_at"],
        idempotency_key=row["idempotency_key"],
        published_at=row["published_at"],
    )


def build_of(row: asyncpg.Record) -> Build:
    return Build(
        build_id=row["build_id"],
        user_id=row["user_id"],
        tier=row["tier"],
        idea_brief=row["idea_brief"],
        understanding_qna=json.loads(row["understanding_qna"]),
        limits=json.loads(row["limits"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        idempotency_key=row["idempotency_key"],
        request_sha256=row["request_sha256"],
        published_at=row["published_at"],
        project_id=row["project_id"],
        project_version=row["project_version"],
        fork_of=row["fork_of"],
        fork_iteration=row["fork_iteration"],
        fork_snapshot_id=row["fork_snapshot_id"],
        state=Projection(**{k: row[k] for k in PROJECTION_COLUMNS}),
    )
