"""Webhook deliveries in Postgres: enqueued per event and endpoint, claimed with a lease,
their outcomes recorded, listed and redelivered."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from kiln_contracts.webhooks import WebhookDelivery

from ..ports import Claimed, Outcome

_DELIVERY = """id, endpoint_id, build_id, event_type, event_id, seq, status, attempts,
CASE WHEN status = 'pending' THEN next_attempt_at END AS next_attempt_at, last_attempt_at,
last_status_code, last_error, created_at, delivered_at"""


def _delivery(row: asyncpg.Record) -> WebhookDelivery:
    fields: dict[str, Any] = dict(row)
    fields["sequence"] = fields.pop("seq")
    return WebhookDelivery.model_validate(fields)


class PgDeliveries:
    """The store's deliveries."""

    pool: asyncpg.Pool

    async def enqueue(
        self,
        user_id: str,
        build_id: str,
        event_type: str,
        event_id: str,
        seq: int,
        body: bytes,
    ) -> int:
        done = await self.pool.execute(
            """INSERT INTO deliveries
                (id, endpoint_id, user_id, build_id, event_type, event_id, seq, body)
            SELECT 'msg_' || md5(e.id || '/' || $4), e.id, $1, $2, $3, $4::uuid, $5, $6
            FROM endpoints e
            WHERE e.user_id = $1 AND e.enabled AND $3 = ANY (e.event_types)
            ON CONFLICT (id) DO NOTHING""",
            user_id,
            build_id,
            event_type,
            event_id,
            seq,
            body,
        )
        return int(done.rsplit(" ", 1)[-1])

    async def claim(self, limit: int, lease_s: float) -> list[Claimed]:
        token = uuid.uuid4().hex
        rows = await self.pool.fetch(
            """WITH due AS (
                SELECT d.id FROM deliveries d JOIN endpoints e ON e.id = d.endpoint_id
                WHERE d.status = 'pending' AND d.next_attempt_at <= now() AND e.enabled
                  AND (d.lease_until IS NULL OR d.lease_until < now())
                  AND NOT EXISTS (
                      SELECT 1 FROM deliveries p
                      WHERE p.endpoint_id = d.endpoint_id AND p.build_id = d.build_id
                        AND p.status = 'pending' AND p.seq < d.seq)
                ORDER BY d.next_attempt_at, d.seq
                LIMIT $1
                FOR UPDATE OF d SKIP LOCKED
            )
            UPDATE deliveries d SET
                lease_until = now() + make_interval(secs => $2::double precision),
                lease_token = $3, attempts = d.attempts + 1
            FROM due, endpoints e
            WHERE d.id = due.id AND e.id = d.endpoint_id
            RETURNING d.id, d.endpoint_id, d.build_id, d.event_type, d.attempts, d.body, e.url,
                e.secret,
                CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END
                    AS previous_secret""",
            limit,
            float(lease_s),
            token,
        )
        return [
            Claimed(
                delivery_id=r["id"],
                endpoint_id=r["endpoint_id"],
                build_id=r["build_id"],
                event_type=r["event_type"],
                attempts=r["attempts"],
                body=bytes(r["body"]),
                url=r["url"],
                secrets=[s for s in (r["secret"], r["previous_secret"]) if s],
                token=token,
            )
            for r in rows
        ]

    async def record(self, claimed: Claimed, outcome: Outcome) -> str | None:
        async with self.pool.acquire() as conn, conn.transaction():
            if outcome.ok:
                status, retry = "delivered", None
            elif outcome.retry_in_s is not None:
                status, retry = "pending", float(outcome.retry_in_s)
            else:
                status, retry = "failed", None
            updated = await conn.execute(
                """UPDATE deliveries SET status = $3,
                    next_attempt_at = CASE WHEN $4::double precision IS NULL THEN next_attempt_at
                        ELSE now() + make_interval(secs => $4::double precision) END,
                    lease_until = NULL, lease_token = NULL, last_attempt_at = now(),
                    last_status_code = $5, last_error = $6,
                    delivered_at = CASE WHEN $3 = 'delivered' THEN now() END
                WHERE id = $1 AND lease_token = $2""",
                claimed.delivery_id,
                claimed.token,
                status,
                retry,
                outcome.status_code,
                outcome.error,
            )
            if not updated.endswith(" 1"):
                return None  # the lease ran out and another attempt owns the delivery now
            if outcome.ok:
                await conn.execute(
                    "UPDATE endpoints SET failing_since = NULL WHERE id = $1 "
                    "AND failing_since IS NOT NULL",
                    claimed.endpoint_id,
                )
                return None
            row = await conn.fetchrow(
                """UPDATE endpoints SET failing_since = coalesce(failing_since, now())
                WHERE id = $1 RETURNING failing_since,
                    coalesce(failing_since, now()) <= now() - make_interval(
                        secs => $2::double precision) AS overdue""",
                claimed.endpoint_id,
                float(outcome.disable_after_s),
            )
            if row is None or not row["overdue"] or outcome.disable_after_s <= 0:
                return None
            reason = (
                f"every delivery has failed since {row['failing_since'].isoformat()} "
                f"(last: {outcome.error or outcome.status_code})"
            )
            done = await conn.execute(
                "UPDATE endpoints SET enabled = false, disabled_reason = $2, updated_at = now() "
                "WHERE id = $1 AND enabled",
                claimed.endpoint_id,
                reason[:1000],
            )
            return reason if done.endswith(" 1") else None

    async def deliveries(
        self,
        user_id: str,
        endpoint_id: str,
        status: str | None,
        limit: int,
        before: datetime | None,
    ) -> list[WebhookDelivery] | None:
        async with self.pool.acquire() as conn:
            owner = await conn.fetchval(
                "SELECT 1 FROM endpoints WHERE id = $1 AND user_id = $2", endpoint_id, user_id
            )
            if owner is None:
                return None
            rows = await conn.fetch(
                f"""SELECT {_DELIVERY} FROM deliveries
                WHERE endpoint_id = $1 AND ($2::text IS NULL OR status = $2)
                  AND ($3::timestamptz IS NULL OR created_at < $3)
                ORDER BY created_at DESC, seq DESC LIMIT $4""",
                endpoint_id,
                status,
                before,
                limit,
            )
        return [_delivery(r) for r in rows]

    async def redeliver(
        self, user_id: str, endpoint_id: str, delivery_id: str
    ) -> WebhookDelivery | None:
        # A new attempt now, with the same webhook-id; one under way keeps its lease.
        row = await self.pool.fetchrow(
            """UPDATE deliveries d SET status = 'pending', next_attempt_at = now(),
                delivered_at = CASE WHEN d.status = 'pending' THEN d.delivered_at END
            FROM endpoints e
            WHERE d.id = $3 AND d.endpoint_id = $1 AND e.id = d.endpoint_id AND e.user_id = $2
            RETURNING d.id""",
            endpoint_id,
            user_id,
            delivery_id,
        )
        if row is None:
            return None
        got = await self.pool.fetchrow(f"SELECT {_DELIVERY} FROM deliveries WHERE id = $1", row[0])
        return _delivery(got) if got else None

    async def backlog(self) -> int:
        n = await self.pool.fetchval("SELECT count(*) FROM deliveries WHERE status = 'pending'")
        return int(n or 0)
