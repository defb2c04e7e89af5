"""Builds and their projection (the read model) in Postgres (table ``builds``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from typing import Any, Literal

import asyncpg

from kiln_contracts import BuildRequested

from ..model import Build, NewBuild, Projection
from ..ports import Inserted
from .pg_rows import PROJECTION_COLUMNS, TERMINAL_STATUSES, build_of


async def lock_user(conn: asyncpg.Connection, user_id: str) -> None:
    """Hold the user's lock until the transaction ends: one creation at a time per user (of a
    build, or of a message that starts one again), so the idempotency checks and the cap are
    exact."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('build:' || $1))", user_id)


async def active_builds(conn: asyncpg.Connection, user_id: str) -> int:
    """How many of the user's builds have not ended (what the tier's cap counts)."""
    count = await conn.fetchval(
        "SELECT count(*) FROM builds WHERE user_id = $1 AND status <> ALL($2::text[])",
        user_id,
        TERMINAL_STATUSES,
    )
    return int(count)


class PgBuilds:
    """The store's builds and their read model."""

    pool: asyncpg.Pool

    async def insert_build(self, new: NewBuild, *, cap: int) -> Inserted:
        async with self.pool.acquire() as conn, conn.transaction():
            await lock_user(conn, new.user_id)
            if new.idempotency_key is not None:
                row = await conn.fetchrow(
                    "SELECT * FROM builds WHERE user_id = $1 AND idempotency_key = $2",
                    new.user_id,
                    new.idempotency_key,
                )
                if row:
                    return Inserted("existing", build_of(row))
            if await active_builds(conn, new.user_id) >= cap:
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
            return Inserted("created", build_of(row))

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
        return [build_of(r) for r in rows]

    async def get(self, build_id: str) -> Build | None:
        row = await self.pool.fetchrow("SELECT * FROM builds WHERE build_id = $1", build_id)
        return build_of(row) if row else None

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
        return [build_of(r) for r in rows]

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

    async def preview_holder(self, port: int) -> str | None:
        # Running builds only (few, on the local provider this serves), newest claim first.
        return await self.pool.fetchval(
            """
            SELECT b.build_id FROM builds b, jsonb_array_elements(b.previews::jsonb) e
            WHERE b.status = 'running' AND e->>'port' = $1 AND e->>'status' = 'available'
              AND e->>'provider' = 'local'
            ORDER BY (e->>'seq')::bigint DESC LIMIT 1
            """,
            str(port),
        )

    async def update_projection(
        self, build_id: str, seq: int, evolve: Callable[[Projection], Projection]
    ) -> Literal["applied", "duplicate", "missing"]:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {', '.join(PROJECTION_COLUMNS)} FROM builds WHERE build_id = $1 FOR UPDATE",
                build_id,
            )
            if row is None:
                return "missing"
            current = Projection(**dict(row))
            if seq <= current.last_seq:
                return "duplicate"
            new = asdict(evolve(current))
            sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(PROJECTION_COLUMNS, start=2))
            await conn.execute(
                f"UPDATE builds SET {sets}, updated_at = now() WHERE build_id = $1",
                build_id,
                *(new[k] for k in PROJECTION_COLUMNS),
            )
            return "applied"
