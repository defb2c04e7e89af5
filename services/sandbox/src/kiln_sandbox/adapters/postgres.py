"""The exactly-once ledger of tool calls, the build -> sandbox registry and the read log, in
schema "sandbox" (the background processes' table: ``pg_processes``)."""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any, cast

import asyncpg

from kiln_runtime.db import Migration, read_migrations, waits_out_outages

from ..records import CallRecord, SandboxRecord, SandboxState

SCHEMA = "sandbox"


def migrations() -> list[Migration]:
    """This schema's migrations: ``migrations/NNNN_name.sql`` beside this module."""
    return read_migrations(files("kiln_sandbox.adapters") / "migrations")


class PgCallStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def get(self, build_id: str, call_id: str) -> CallRecord | None:
        row = await self.pool.fetchrow(
            "SELECT status, result, owner, "
            "COALESCE(EXTRACT(EPOCH FROM (lease_until - now())), 0)::float8 AS lease_left "
            "FROM calls WHERE build_id = $1 AND call_id = $2",
            build_id,
            call_id,
        )
        if row is None:
            return None
        result = json.loads(row["result"]) if row["result"] is not None else None
        return CallRecord(
            status=cast(Any, row["status"]),
            result=result,
            owner=row["owner"],
            lease_left_s=float(row["lease_left"]),
        )

    async def claim(
        self, build_id: str, call_id: str, owner: str, lease_s: float, iteration: int = 0
    ) -> CallRecord | None:
        # One statement when the call is new (the usual case); a SELECT only on a conflict.
        while True:
            inserted = await self.pool.fetchval(
                "INSERT INTO calls (build_id, call_id, status, owner, lease_until, iteration) "
                "VALUES ($1, $2, 'started', $3, now() + make_interval(secs => $4), $5) "
                "ON CONFLICT DO NOTHING RETURNING true",
                build_id,
                call_id,
                owner,
                lease_s,
                iteration,
            )
            if inserted:
                return None
            seen = await self.get(build_id, call_id)
            if seen is not None:
                return seen
            # Released (deleted) in between by a replica that could not run it: free again.

    async def last_iteration(self, build_id: str) -> int:
        found = await self.pool.fetchval(
            "SELECT coalesce(max(iteration), 0) FROM calls WHERE build_id = $1", build_id
        )
        return int(found or 0)

    async def release(self, build_id: str, call_id: str, owner: str) -> None:
        await self.pool.execute(
            "DELETE FROM calls "
            "WHERE build_id = $1 AND call_id = $2 AND owner = $3 AND status = 'started'",
            build_id,
            call_id,
            owner,
        )

    async def renew(self, build_id: str, call_id: str, owner: str, lease_s: float) -> None:
        await self.pool.execute(
            "UPDATE calls SET lease_until = now() + make_interval(secs => $4) "
            "WHERE build_id = $1 AND call_id = $2 AND owner = $3 AND status = 'started'",
            build_id,
            call_id,
            owner,
            lease_s,
        )

    @waits_out_outages
    async def finish(self, build_id: str, call_id: str, result: dict[str, Any]) -> None:
        await self.pool.execute(
            "UPDATE calls SET status = 'done', result = $3::jsonb, updated_at = now() "
            "WHERE build_id = $1 AND call_id = $2",
            build_id,
            call_id,
            json.dumps(result),
        )


class PgRegistry:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def get(self, build_id: str) -> SandboxRecord | None:
        row = await self.pool.fetchrow(
            "SELECT build_id, provider, sandbox_id, state, iteration, has_processes "
            "FROM sandboxes WHERE build_id = $1",
            build_id,
        )
        if row is None:
            return None
        return SandboxRecord(
            row["build_id"],
            row["provider"],
            row["sandbox_id"],
            cast(SandboxState, row["state"]),
            row["iteration"],
            row["has_processes"],
        )

    async def replace(self, record: SandboxRecord, expected: str | None) -> SandboxRecord:
        row = await self.pool.fetchrow(
            "INSERT INTO sandboxes (build_id, provider, sandbox_id, state, iteration, "
            "has_processes) VALUES ($1, $2, $3, $4, $6, $7) "
            "ON CONFLICT (build_id) DO UPDATE SET provider = EXCLUDED.provider, "
            "sandbox_id = EXCLUDED.sandbox_id, state = EXCLUDED.state, "
            "iteration = EXCLUDED.iteration, updated_at = now(), "
            "has_processes = sandboxes.has_processes OR EXCLUDED.has_processes "
            "WHERE sandboxes.sandbox_id IS NOT DISTINCT FROM $5 RETURNING build_id",
            record.build_id,
            record.provider,
            record.sandbox_id,
            record.state,
            expected,
            record.iteration,
            record.has_processes,
        )
        if row is not None:
            return record
        held = await self.get(record.build_id)  # another replica's, recorded first
        return held if held is not None else record

    async def mark_processes(self, build_id: str) -> None:
        await self.pool.execute(
            "UPDATE sandboxes SET has_processes = true WHERE build_id = $1", build_id
        )

    async def put(self, record: SandboxRecord) -> None:
        await self.pool.execute(
            "INSERT INTO sandboxes (build_id, provider, sandbox_id, state, iteration, "
            "has_processes) VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (build_id) DO UPDATE SET provider = EXCLUDED.provider, "
            "sandbox_id = EXCLUDED.sandbox_id, state = EXCLUDED.state, "
            "iteration = EXCLUDED.iteration, updated_at = now(), "
            "has_processes = sandboxes.has_processes OR EXCLUDED.has_processes",
            record.build_id,
            record.provider,
            record.sandbox_id,
            record.state,
            record.iteration,
            record.has_processes,
        )


class PgReads:
    """What each build last saw of each file (table ``file_reads``). A sighting counts only once
    the call that made it has its result (a 'done' ledger row that is no error): a read whose call
    was interrupted was never seen by the model. Its statements, made while a tool runs, wait out
    a database outage: a tool that ran and failed on its bookkeeping would be answered as
    interrupted."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @waits_out_outages
    async def saw(self, build_id: str, path: str, sha256: str, call_id: str) -> None:
        await self.pool.execute(
            "INSERT INTO file_reads (build_id, path, sha256, call_id) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (build_id, path) DO UPDATE SET sha256 = EXCLUDED.sha256, "
            "call_id = EXCLUDED.call_id, read_at = now()",
            build_id,
            path,
            sha256,
            call_id,
        )

    @waits_out_outages
    async def last_seen(self, build_id: str, path: str) -> str | None:
        found = await self.pool.fetchval(
            "SELECT r.sha256 FROM file_reads r JOIN calls c "
            "ON c.build_id = r.build_id AND c.call_id = r.call_id "
            "WHERE r.build_id = $1 AND r.path = $2 AND c.status = 'done' "
            "AND NOT coalesce((c.result ->> 'is_error')::boolean, false)",
            build_id,
            path,
        )
        return str(found) if found is not None else None
