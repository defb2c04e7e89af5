"""API keys in Postgres (table ``api_keys``)."""

from __future__ import annotations

import asyncpg

from ..model import ApiKey, Caller
from .pg_rows import key_of


class PgKeys:
    """The store's API keys."""

    pool: asyncpg.Pool

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
        return key_of(row)

    async def find_keys(self, ident: str) -> list[ApiKey]:
        """Keys whose id is ``ident`` or whose shown prefix starts with it."""
        rows = await self.pool.fetch(
            """SELECT * FROM api_keys
               WHERE key_id = $1 OR (key_prefix IS NOT NULL AND key_prefix <> ''
                                     AND starts_with(key_prefix, $1) AND length($1) >= 6)
               ORDER BY created_at LIMIT 10""",
            ident,
        )
        return [key_of(r) for r in rows]

    async def revoke_key(self, key_id: str) -> ApiKey | None:
        row = await self.pool.fetchrow(
            """UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
               WHERE key_id = $1 RETURNING *""",
            key_id,
        )
        return key_of(row) if row else None

    async def list_keys(self, user_id: str | None) -> list[ApiKey]:
        rows = await self.pool.fetch(
            """SELECT * FROM api_keys WHERE ($1::text IS NULL OR user_id = $1)
               ORDER BY created_at DESC LIMIT 1000""",
            user_id,
        )
        return [key_of(r) for r in rows]
