"""Projects and their immutable versions in Postgres (``projects``, ``project_versions``)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

import asyncpg

from ..model import Project
from .pg_rows import PROJECT_SELECT, project_of


class PgProjects:
    """The store's projects."""

    pool: asyncpg.Pool

    async def create_project(
        self, project_id: str, user_id: str, name: str, idea_brief: str, qna: list[dict[str, Any]]
    ) -> Project:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO projects (project_id, user_id, latest_version) VALUES ($1, $2, 1)",
                project_id,
                user_id,
            )
            await conn.execute(
                """INSERT INTO project_versions (project_id, version, name, idea_brief,
                                                 understanding_qna)
                   VALUES ($1, 1, $2, $3, $4)""",
                project_id,
                name,
                idea_brief,
                json.dumps(qna),
            )
            row = await conn.fetchrow(
                PROJECT_SELECT + "WHERE p.project_id = $1 AND v.version = 1", project_id
            )
        return project_of(row)

    async def get_project(self, project_id: str, version: int | None = None) -> Project | None:
        row = await self.pool.fetchrow(
            PROJECT_SELECT
            + "WHERE p.project_id = $1 AND v.version = coalesce($2::int, p.latest_version)",
            project_id,
            version,
        )
        return project_of(row) if row else None

    async def add_project_version(
        self,
        project_id: str,
        base_version: int | None,
        name: str,
        idea_brief: str,
        qna: list[dict[str, Any]],
    ) -> Project | Literal["missing", "conflict"]:
        """A new version; "conflict" if ``base_version`` is given and is not the latest."""
        async with self.pool.acquire() as conn, conn.transaction():
            latest = await conn.fetchval(
                "SELECT latest_version FROM projects WHERE project_id = $1 FOR UPDATE", project_id
            )
            if latest is None:
                return "missing"
            if base_version is not None and base_version != latest:
                return "conflict"
            version = latest + 1
            await conn.execute(
                """INSERT INTO project_versions (project_id, version, name, idea_brief,
                                                 understanding_qna)
                   VALUES ($1, $2, $3, $4, $5)""",
                project_id,
                version,
                name,
                idea_brief,
                json.dumps(qna),
            )
            await conn.execute(
                """UPDATE projects SET latest_version = $2, updated_at = now()
                   WHERE project_id = $1""",
                project_id,
                version,
            )
            row = await conn.fetchrow(
                PROJECT_SELECT + "WHERE p.project_id = $1 AND v.version = $2", project_id, version
            )
        return project_of(row)

    async def list_projects(
        self, user_id: str, *, limit: int, before: tuple[datetime, str] | None
    ) -> list[Project]:
        args: list[Any] = [user_id]
        where = "p.user_id = $1 AND v.version = p.latest_version"
        if before:
            args += list(before)
            where += " AND (p.created_at, p.project_id) < ($2, $3)"
        args.append(limit)
        rows = await self.pool.fetch(
            PROJECT_SELECT + f"WHERE {where} "
            f"ORDER BY p.created_at DESC, p.project_id DESC LIMIT ${len(args)}",
            *args,
        )
        return [project_of(r) for r in rows]

    async def project_versions(self, project_id: str) -> list[Project]:
        rows = await self.pool.fetch(
            PROJECT_SELECT + "WHERE p.project_id = $1 ORDER BY v.version", project_id
        )
        return [project_of(r) for r in rows]
