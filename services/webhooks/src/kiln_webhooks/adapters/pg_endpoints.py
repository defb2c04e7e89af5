"""Webhook endpoints in Postgres: registered, listed, changed, their secrets rotated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from kiln_contracts.webhooks import WebhookEndpoint

_ENDPOINT = """id, url, event_types, description, enabled, disabled_reason, failing_since,
created_at, updated_at, secret_rotated_at,
CASE WHEN previous_secret_expires_at > now() THEN previous_secret_expires_at END
    AS previous_secret_expires_at"""


def _endpoint(row: asyncpg.Record) -> WebhookEndpoint:
    fields: dict[str, Any] = dict(row)
    fields["event_types"] = list(fields["event_types"])
    return WebhookEndpoint.model_validate(fields)


class PgEndpoints:
    """The store's endpoints."""

    pool: asyncpg.Pool

    async def create_endpoint(
        self,
        endpoint_id: str,
        user_id: str,
        url: str,
        event_types: Sequence[str],
        description: str,
        secret: str,
    ) -> WebhookEndpoint:
        row = await self.pool.fetchrow(
            "INSERT INTO endpoints (id, user_id, url, event_types, description, secret) "
            f"VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_ENDPOINT}",
            endpoint_id,
            user_id,
            url,
            list(event_types),
            description,
            secret,
        )
        assert row is not None
        return _endpoint(row)

    async def count_endpoints(self, user_id: str) -> int:
        n = await self.pool.fetchval("SELECT count(*) FROM endpoints WHERE user_id = $1", user_id)
        return int(n or 0)

    async def endpoints(self, user_id: str) -> list[WebhookEndpoint]:
        rows = await self.pool.fetch(
            f"SELECT {_ENDPOINT} FROM endpoints WHERE user_id = $1 ORDER BY created_at, id",
            user_id,
        )
        return [_endpoint(r) for r in rows]

    async def endpoint(self, user_id: str, endpoint_id: str) -> WebhookEndpoint | None:
        row = await self.pool.fetchrow(
            f"SELECT {_ENDPOINT} FROM endpoints WHERE id = $1 AND user_id = $2",
            endpoint_id,
            user_id,
        )
        return _endpoint(row) if row else None

    async def update_endpoint(
        self,
        user_id: str,
        endpoint_id: str,
        *,
        url: str | None,
        event_types: Sequence[str] | None,
        description: str | None,
        enabled: bool | None,
    ) -> WebhookEndpoint | None:
        # Enabling an endpoint clears why it was disabled and its failing streak.
        row = await self.pool.fetchrow(
            f"""UPDATE endpoints SET
                url = coalesce($3, url),
                event_types = coalesce($4, event_types),
                description = coalesce($5, description),
                enabled = coalesce($6, enabled),
                disabled_reason = CASE WHEN $6 IS TRUE THEN NULL ELSE disabled_reason END,
                failing_since = CASE WHEN $6 IS TRUE THEN NULL ELSE failing_since END,
                updated_at = now()
            WHERE id = $1 AND user_id = $2 RETURNING {_ENDPOINT}""",
            endpoint_id,
            user_id,
            url,
            list(event_types) if event_types is not None else None,
            description,
            enabled,
        )
        return _endpoint(row) if row else None

    async def delete_endpoint(self, user_id: str, endpoint_id: str) -> bool:
        done = await self.pool.execute(
            "DELETE FROM endpoints WHERE id = $1 AND user_id = $2", endpoint_id, user_id
        )
        return bool(done.endswith(" 1"))

    async def rotate_secret(
        self, user_id: str, endpoint_id: str, secret: str, overlap_s: int
    ) -> WebhookEndpoint | None:
        row = await self.pool.fetchrow(
            f"""UPDATE endpoints SET
                previous_secret = secret,
                previous_secret_expires_at = now() + make_interval(secs => $4::double precision),
                secret = $3, secret_rotated_at = now(), updated_at = now()
            WHERE id = $1 AND user_id = $2 RETURNING {_ENDPOINT}""",
            endpoint_id,
            user_id,
            secret,
            float(overlap_s),
        )
        return _endpoint(row) if row else None
