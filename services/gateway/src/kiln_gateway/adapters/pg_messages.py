"""Users' messages to builds in Postgres (table ``messages``)."""

from __future__ import annotations

import asyncpg

from ..model import TERMINAL, Message, NewMessage
from ..ports import MessageInserted
from .pg_builds import active_builds, lock_user
from .pg_rows import message_of


class PgMessages:
    """The store's messages."""

    pool: asyncpg.Pool

    async def insert_message(self, new: NewMessage, *, cap: int) -> MessageInserted:
        async with self.pool.acquire() as conn, conn.transaction():
            # the user's lock, as for a new build: the numbering and the cap are exact
            await lock_user(conn, new.user_id)
            if new.idempotency_key is not None:
                row = await conn.fetchrow(
                    "SELECT * FROM messages WHERE build_id = $1 AND idempotency_key = $2",
                    new.build_id,
                    new.idempotency_key,
                )
                if row:
                    return MessageInserted("existing", message_of(row))
            status = await conn.fetchval(
                "SELECT status FROM builds WHERE build_id = $1", new.build_id
            )
            if status in TERMINAL:
                if await active_builds(conn, new.user_id) >= cap:
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
            return MessageInserted("created", message_of(row))

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
        return [message_of(r) for r in rows]

    async def mark_message_published(self, message_id: str) -> None:
        await self.pool.execute(
            "UPDATE messages SET published_at = now() "
            "WHERE message_id = $1 AND published_at IS NULL",
            message_id,
        )
