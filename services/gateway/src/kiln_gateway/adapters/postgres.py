"""The builds read model and API keys in Postgres (schema ``gateway``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from importlib.resources import files
from typing import Any, Literal

import asyncpg

from kiln_contracts import BuildRequested
from kiln_runtime.db import Migration, read_migrations

from ..model import (
    TERMINAL,
    ApiKey,
    Build,
    Caller,
    Message,
    NewBuild,
    NewMessage,
    Project,
    Projection,
)
from ..ports import Inserted, MessageInserted


def migrations() -> list[Migration]:
    """This schema's migrations: ``migrations/NNNN_name.sql`` beside this module."""
    return read_migrations(files("kiln_gateway.adapters") / "migrations")


_PROJECT_SELECT = """
SELECT p.project_id, p.user_id, p.latest_version, p.created_at, v.version, v.name,
       v.idea_brief, v.understanding_qna, v.created_at AS updated_at
FROM projects p JOIN project_versions v ON v.project_id = p.project_id
"""

_PROJECTION = tuple(Projection.__dataclass_fields__)
_TERMINAL = sorted(TERMINAL)


def _project(row: asyncpg.Record) -> Project:
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


def _key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        key_id=row["key_id"] or row["key_sha256"][:16],
        key_prefix=row["key_prefix"] or "",
        user_id=row["user_id"],
        tier=row["tier"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


def _message(row: asyncpg.Record) -> Message:
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


def _build(row: asyncpg.Record) -> Build:
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
        state=Projection(**{k: row[k] for k in _PROJECTION}),
    )


class PgStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1", timeout=2)

    # ------------------------------------------------------------------ keys

    async def caller_for_key(self, key_sha256: str) -> Caller | None:
        row = await self.pool.fetchrow(
            "SELECT user_id, tier FROM api_keys WHERE key_sha256 = $1 AND revoked_at IS NULL",
            key_sha256,
        )
        return Caller(row["user_id"], row["tier"]) if row else None

    async def upsert_key(self, key_sha256: str, user_id: str, tier: str) -> None:
        await self.pool.execute(
            """INSERT INTO api_keys (key_sha256, key_id, user_id, tier)
               VALUES ($1, left($1, 16), $2, $3)
               ON CONFLICT (key_sha256) DO UPDATE
               SET user_id = EXCLUDED.user_id, tier = EXCLUDED.tier, revoked_at = NULL""",
            key_sha256,
            user_id,
            tier,
        )

    async def create_key(
        self, key_sha256: str, key_id: str, key_prefix: str, user_id: str, tier: str
    ) -> ApiKey:
        row = await self.pool.fetchrow(
            """INSERT INTO api_keys (key_sha256, key_id, key_prefix, user_id, tier)
               VALUES ($1, $2, $3, $4, $5) RETURNING *""",
            key_sha256,
            key_id,
            key_prefix,
            user_id,
            tier,
        )
        return _key(row)

    async def find_keys(self, ident: str) -> list[ApiKey]:
        """Keys whose id is ``ident`` or whose shown prefix starts with it."""
        rows = await self.pool.fetch(
            """SELECT * FROM api_keys
               WHERE key_id = $1 OR (key_prefix IS NOT NULL AND key_prefix <> ''
                                     AND starts_with(key_prefix, $1) AND length($1) >= 6)
               ORDER BY created_at LIMIT 10""",
            ident,
        )
        return [_key(r) for r in rows]

    async def revoke_key(self, key_id: str) -> ApiKey | None:
        row = await self.pool.fetchrow(
            """UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
               WHERE key_id = $1 RETURNING *""",
            key_id,
        )
        return _key(row) if row else None

    async def list_keys(self, user_id: str | None) -> list[ApiKey]:
        rows = await self.pool.fetch(
            """SELECT * FROM api_keys WHERE ($1::text IS NULL OR user_id = $1)
               ORDER BY created_at DESC LIMIT 1000""",
            user_id,
        )
        return [_key(r) for r in rows]

    # ------------------------------------------------------------------ projects

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
                _PROJECT_SELECT + "WHERE p.project_id = $1 AND v.version = 1", project_id
            )
        return _project(row)

    async def get_project(self, project_id: str, version: int | None = None) -> Project | None:
        row = await self.pool.fetchrow(
            _PROJECT_SELECT
            + "WHERE p.project_id = $1 AND v.version = coalesce($2::int, p.latest_version)",
            project_id,
            version,
        )
        return _project(row) if row else None

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
                _PROJECT_SELECT + "WHERE p.project_id = $1 AND v.version = $2", project_id, version
            )
        return _project(row)

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
            _PROJECT_SELECT + f"WHERE {where} "
            f"ORDER BY p.created_at DESC, p.project_id DESC LIMIT ${len(args)}",
            *args,
        )
        return [_project(r) for r in rows]

    async def project_versions(self, project_id: str) -> list[Project]:
        rows = await self.pool.fetch(
            _PROJECT_SELECT + "WHERE p.project_id = $1 ORDER BY v.version", project_id
        )
        return [_project(r) for r in rows]

    # ------------------------------------------------------------------ builds

    async def insert_build(self, new: NewBuild, *, cap: int) -> Inserted:
        async with self.pool.acquire() as conn, conn.transaction():
            # One creation at a time per user: the idempotency check and the cap are exact.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('build:' || $1))", new.user_id
            )
            if new.idempotency_key is not None:
                row = await conn.fetchrow(
                    "SELECT * FROM builds WHERE user_id = $1 AND idempotency_key = $2",
                    new.user_id,
                    new.idempotency_key,
                )
                if row:
                    return Inserted("existing", _build(row))
            active = await conn.fetchval(
                "SELECT count(*) FROM builds WHERE user_id = $1 AND status <> ALL($2::text[])",
                new.user_id,
                _TERMINAL,
            )
            if active >= cap:
                return Inserted("capped", None)
            row = await conn.fetchrow(
                """INSERT INTO builds (build_id, user_id, tier, idea_brief, understanding_qna,
                                       limits, idempotency_key, request_sha256, project_id,
                                       project_version, fork_of, fork_iteration,
                                       fork_snapshot_id)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                   RETURNING *""",
                new.build_id,
                new.user_id,
                new.tier,
                new.idea_brief,
                json.dumps(new.understanding_qna),
                json.dumps(new.limits),
                new.idempotency_key,
                new.request_sha256,
                new.project_id,
                new.project_version,
                new.fork_of,
                new.fork_iteration,
                new.fork_snapshot_id,
            )
            return Inserted("created", _build(row))

    async def mark_published(self, build_id: str) -> None:
        await self.pool.execute(
            "UPDATE builds SET published_at = now() WHERE build_id = $1 AND published_at IS NULL",
            build_id,
        )

    async def unpublished(self, older_than_s: float, limit: int = 100) -> list[Build]:
        rows = await self.pool.fetch(
            """SELECT * FROM builds WHERE published_at IS NULL
               AND created_at <= now() - make_interval(secs => $1)
               ORDER BY created_at LIMIT $2""",
            older_than_s,
            limit,
        )
        return [_build(r) for r in rows]

    async def get(self, build_id: str) -> Build | None:
        row = await self.pool.fetchrow("SELECT * FROM builds WHERE build_id = $1", build_id)
        return _build(row) if row else None

    async def count_with_status(self, status: str) -> int:
        count = await self.pool.fetchval("SELECT count(*) FROM builds WHERE status = $1", status)
        return int(count or 0)

    async def list_for_user(
        self,
        user_id: str,
        *,
        status: str | None,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[Build]:
        args: list[Any] = [user_id]
        where = ["user_id = $1"]
        if status:
            args.append(status)
            where.append(f"status = ${len(args)}")
        if before:
            args += list(before)
            where.append(f"(created_at, build_id) < (${len(args) - 1}, ${len(args)})")
        args.append(limit)
        rows = await self.pool.fetch(
            f"SELECT * FROM builds WHERE {' AND '.join(where)} "
            f"ORDER BY created_at DESC, build_id DESC LIMIT ${len(args)}",
            *args,
        )
        return [_build(r) for r in rows]

    # ------------------------------------------------------------------ messages

    async def insert_message(self, new: NewMessage, *, cap: int) -> MessageInserted:
        async with self.pool.acquire() as conn, conn.transaction():
            # the user's lock, as for a new build: the numbering and the cap are exact
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('build:' || $1))", new.user_id
            )
            if new.idempotency_key is not None:
                row = await conn.fetchrow(
                    "SELECT * FROM messages WHERE build_id = $1 AND idempotency_key = $2",
                    new.build_id,
                    new.idempotency_key,
                )
                if row:
                    return MessageInserted("existing", _message(row))
            status = await conn.fetchval(
                "SELECT status FROM builds WHERE build_id = $1", new.build_id
            )
            if status in TERMINAL:
                active = await conn.fetchval(
                    "SELECT count(*) FROM builds WHERE user_id = $1 AND status <> ALL($2::text[])",
                    new.user_id,
                    _TERMINAL,
                )
                if active >= cap:
                    return MessageInserted("capped", None)
            row = await conn.fetchrow(
                """INSERT INTO messages (message_id, build_id, seq, user_id, text,
                                         idempotency_key, request_sha256)
                   SELECT $1, $2, coalesce(max(seq), 0) + 1, $3, $4, $5, $6
                   FROM messages WHERE build_id = $2
                   RETURNING *""",
                new.message_id,
                new.build_id,
                new.user_id,
                new.text,
                new.idempotency_key,
                new.request_sha256,
            )
            return MessageInserted("created", _message(row))

    async def unpublished_messages(
        self, build_id: str | None = None, older_than_s: float = 0.0, limit: int = 100
    ) -> list[Message]:
        rows = await self.pool.fetch(
            """SELECT * FROM messages WHERE published_at IS NULL
               AND ($1::text IS NULL OR build_id = $1)
               AND created_at <= now() - make_interval(secs => $2)
               ORDER BY build_id, seq LIMIT $3""",
            build_id,
            older_than_s,
            limit,
        )
        return [_message(r) for r in rows]

    async def mark_message_published(self, message_id: str) -> None:
        await self.pool.execute(
            "UPDATE messages SET published_at = now() "
            "WHERE message_id = $1 AND published_at IS NULL",
            message_id,
        )

    # ------------------------------------------------------------------ projection

    async def insert_from_event(self, event: BuildRequested) -> None:
        await self.pool.execute(
            """INSERT INTO builds (build_id, user_id, tier, idea_brief, understanding_qna, limits,
                                   published_at, created_at, fork_of, fork_iteration,
                                   fork_snapshot_id)
               VALUES ($1, $2, $3, $4, $5, $6, now(), $7, $8, $9, $10)
               ON CONFLICT (build_id) DO NOTHING""",
            event.build_id,
            event.user_id,
            event.tier,
            event.idea_brief,
            json.dumps([q.model_dump(mode="json") for q in event.understanding_qna]),
            event.limits.model_dump_json(),
            event.occurred_at,
            event.fork.build_id if event.fork else None,
            event.fork.iteration if event.fork else None,
            event.fork.snapshot_id if event.fork else None,
        )

    async def update_projection(
        self, build_id: str, seq: int, evolve: Callable[[Projection], Projection]
    ) -> Literal["applied", "duplicate", "missing"]:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {', '.join(_PROJECTION)} FROM builds WHERE build_id = $1 FOR UPDATE",
                build_id,
            )
            if row is None:
                return "missing"
            current = Projection(**dict(row))
            if seq <= current.last_seq:
                return "duplicate"
            new = asdict(evolve(current))
            sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(_PROJECTION, start=2))
            await conn.execute(
                f"UPDATE builds SET {sets}, updated_at = now() WHERE build_id = $1",
                build_id,
                *(new[k] for k in _PROJECTION),
            )
            return "applied"
