"""The checkpoint in Postgres (schema "agent"): a small ``builds`` row per build, advanced with
optimistic concurrency, and an append-only ``turns`` table, so a save never rewrites history.

A turn's content is ``json``, not ``jsonb``: it reads back as the text that was written (jsonb
would reorder the keys), so requests built from turns read back and from turns kept in memory
are byte-identical, as prompt caching needs."""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

import asyncpg

from kiln_contracts import BuildLimits
from kiln_runtime.db import Migration, read_migrations

from ..checkpoint import Checkpoint, State, Turn, dump_outbox, load_outbox
from ..ports import NO_LEASE_CHANGE, Idle, LeaseChange, VersionConflict

SCHEMA = "agent"


def migrations() -> list[Migration]:
    """This schema's migrations: ``migrations/NNNN_name.sql`` beside this module."""
    return read_migrations(files("kiln_agent.adapters") / "migrations")


_COLUMNS = (
    "build_id, user_id, version, status, iteration, model, tier, limits, cost_micro_usd, "
    "system, turns, state, outbox"
)


def _free(token: str) -> str:
    """SQL: the lease can be taken by the token in parameter ``token`` (free, run out, or the
    token's own already)."""
    return (
        f"{token}::text IS NOT NULL "
        f"AND (lease_until IS NULL OR lease_until <= now() OR lease_token = {token})"
    )


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(self, cp: Checkpoint, turns: list[Turn]) -> bool:
        # one statement: the row, and its turns only if the row is new
        version = await self.pool.fetchval(
            f"WITH b AS (INSERT INTO builds ({_COLUMNS}) VALUES "
            "($1, $2, 1, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) "
            "ON CONFLICT (build_id) DO NOTHING RETURNING version), "
            "t AS (INSERT INTO turns (build_id, seq, role, content, iteration) "
            "SELECT $1, x.seq, x.role, x.content::json, x.iteration "
            "FROM unnest($13::integer[], $14::text[], $15::text[], $16::integer[]) "
            "AS x(seq, role, content, iteration) "
            "WHERE EXISTS (SELECT 1 FROM b)) "
            "SELECT version FROM b",
            cp.build_id,
            cp.user_id,
            cp.status,
            cp.iteration,
            cp.model,
            cp.tier,
            cp.limits.model_dump_json(),
            cp.cost_micro_usd,
            cp.system,
            cp.turns,
            cp.state.model_dump_json(),
            json.dumps(dump_outbox(cp.outbox)),
            [t.seq for t in turns],
            [t.role for t in turns],
            [t.content_json for t in turns],
            [t.iteration for t in turns],
        )
        if version is None:
            return False
        cp.version = 1
        return True

    async def load(self, build_id: str) -> Checkpoint | None:
        row = await self.pool.fetchrow(
            f"SELECT {_COLUMNS} FROM builds WHERE build_id = $1", build_id
        )
        return None if row is None else _checkpoint(row)

    async def take_lease(
        self, build_id: str, token: str, ttl_s: float
    ) -> tuple[float, Checkpoint | None]:
        row = await self.pool.fetchrow(
            "UPDATE builds SET lease_token = $2, lease_until = now() + make_interval(secs => $3) "
            f"WHERE build_id = $1 AND {_free('$2')} RETURNING {_COLUMNS}",
            build_id,
            token,
            ttl_s,
        )
        if row is not None:
            return 0.0, _checkpoint(row)
        return await self._wait(build_id), None

    async def turns(self, build_id: str, since: int = 0) -> list[Turn]:
        rows = await self.pool.fetch(
            "SELECT seq, role, content, iteration FROM turns WHERE build_id = $1 AND seq >= $2 "
            "ORDER BY seq",
            build_id,
            since,
        )
        return [
            Turn(r["seq"], r["role"], json.loads(r["content"]), r["iteration"], r["content"])
            for r in rows
        ]

    async def save(
        self,
        cp: Checkpoint,
        new_turns: list[Turn],
        lease: LeaseChange = NO_LEASE_CHANGE,
    ) -> bool:
        # one statement (atomic on its own): the row's update and the new turns, which are
        # inserted only if the update matched the version; the lease of token $13 given up, or
        # taken for token $14 if it is free (the SET sees the row as it was before the update)
        took = await self.pool.fetchval(
            "WITH u AS (UPDATE builds SET version = version + 1, status = $3, iteration = $4, "
            "cost_micro_usd = $5, turns = $6, state = $7, outbox = $8, model = $9, "
            f"lease_until = CASE WHEN lease_token = $13 THEN NULL WHEN {_free('$14')} "
            "THEN now() + make_interval(secs => $15) ELSE lease_until END, "
            "lease_token = CASE WHEN lease_token = $13 THEN NULL "
            f"WHEN {_free('$14')} THEN $14 ELSE lease_token END, "
            "updated_at = now() WHERE build_id = $1 AND version = $2 "
            "RETURNING coalesce(lease_token = $14, false) AS took), "
            "t AS (INSERT INTO turns (build_id, seq, role, content, iteration) "
            "SELECT $1, x.seq, x.role, x.content::json, x.iteration "
            "FROM unnest($10::integer[], $11::text[], $12::text[], $16::integer[]) "
            "AS x(seq, role, content, iteration) "
            "WHERE EXISTS (SELECT 1 FROM u)) "
            "SELECT took FROM u",
            cp.build_id,
            cp.version,
            cp.status,
            cp.iteration,
            cp.cost_micro_usd,
            cp.turns,
            cp.state.model_dump_json(),
            json.dumps(dump_outbox(cp.outbox)),
            cp.model,
            [t.seq for t in new_turns],
            [t.role for t in new_turns],
            [t.content_json for t in new_turns],
            lease.give_up,
            lease.take,
            lease.ttl_s,
            [t.iteration for t in new_turns],
        )
        if took is None:
            raise VersionConflict(cp.build_id)
        cp.version += 1
        return bool(took)

    async def mark_sent(self, sent: dict[str, int]) -> None:
        await self.pool.execute(
            "UPDATE builds b SET outbox = '[]' "
            "FROM unnest($1::text[], $2::integer[]) AS s(build_id, version) "
            "WHERE b.build_id = s.build_id AND b.version = s.version",
            list(sent),
            list(sent.values()),
        )

    async def extend_lease(self, build_id: str, token: str, ttl_s: float) -> bool:
        renewed = await self.pool.fetchval(
            "UPDATE builds SET lease_until = now() + make_interval(secs => $3) "
            "WHERE build_id = $1 AND lease_token = $2 RETURNING true",
            build_id,
            token,
            ttl_s,
        )
        return bool(renewed)

    async def extend_leases(self, leases: dict[str, str], ttl_s: float) -> set[str]:
        if not leases:
            return set()
        rows = await self.pool.fetch(
            "UPDATE builds b SET lease_until = now() + make_interval(secs => $3) "
            "FROM unnest($1::text[], $2::text[]) AS x(build_id, token) "
            "WHERE b.build_id = x.build_id AND b.lease_token = x.token RETURNING b.build_id",
            list(leases),
            list(leases.values()),
            ttl_s,
        )
        return {r["build_id"] for r in rows}

    async def _wait(self, build_id: str) -> float:
        """The seconds left on another holder's lease (0.0: there is no such build)."""
        row = await self.pool.fetchrow(
            "SELECT extract(epoch FROM lease_until - now())::float8 AS left FROM builds "
            "WHERE build_id = $1",
            build_id,
        )
        return 0.0 if row is None else max(0.001, float(row["left"] or 0.001))

    async def release_lease(self, build_id: str, token: str) -> None:
        await self.pool.execute(
            "UPDATE builds SET lease_token = NULL, lease_until = NULL "
            "WHERE build_id = $1 AND lease_token = $2",
            build_id,
            token,
        )

    async def idle(self, idle_s: float, limit: int) -> list[Idle]:
        rows = await self.pool.fetch(
            "SELECT build_id, version, extract(epoch FROM now() - updated_at)::float8 AS idle "
            "FROM builds WHERE status IN ('thinking', 'acting') "
            "AND updated_at <= now() - make_interval(secs => $1) "
            "AND (lease_until IS NULL OR lease_until <= now()) ORDER BY updated_at LIMIT $2",
            idle_s,
            limit,
        )
        return [Idle(r["build_id"], r["version"], r["idle"]) for r in rows]


def _checkpoint(row: Any) -> Checkpoint:
    return Checkpoint(
        build_id=row["build_id"],
        user_id=row["user_id"],
        version=row["version"],
        status=row["status"],
        iteration=row["iteration"],
        model=row["model"],
        tier=row["tier"],
        limits=BuildLimits.model_validate_json(row["limits"]),
        cost_micro_usd=row["cost_micro_usd"],
        system=row["system"],
        turns=row["turns"],
        state=State.model_validate_json(row["state"]),
        outbox=load_outbox(json.loads(row["outbox"])),
    )
