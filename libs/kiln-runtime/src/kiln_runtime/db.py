"""Postgres pools with timeouts; schema set-up is each service's own (a schema per service)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from .retry import backoff_delay

log = logging.getLogger(__name__)


async def create_pool(
    url: str,
    *,
    schema: str,
    ddl: str,
    min_size: int = 1,
    max_size: int = 10,
    reset_sessions: bool = True,
) -> asyncpg.Pool:
    """A pool whose connections use ``schema``; ``ddl`` (idempotent) is applied once.

    ``reset_sessions=False`` skips asyncpg's reset query (advisory unlock, CLOSE ALL, UNLISTEN,
    RESET ALL: one more round trip) each time a connection goes back to the pool; an open
    transaction is still rolled back. Only for code that never changes session state.
    """
    for attempt in range(1, 31):
        try:
            admin = await asyncpg.connect(url, timeout=10)
            break
        except (OSError, asyncpg.PostgresError) as err:
            if attempt == 30:
                raise
            log.warning("Postgres not reachable (%s); retrying", err)
            await asyncio.sleep(backoff_delay(attempt, base=0.2, cap=2.0))
    try:
        async with admin.transaction():
            # Serialise concurrent start-ups of replicas applying the same DDL.
            await admin.execute("SELECT pg_advisory_xact_lock(hashtext($1))", schema)
            await admin.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await admin.execute(f'SET LOCAL search_path TO "{schema}"')
            await admin.execute(ddl)
    finally:
        await admin.close()
    pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        command_timeout=30,
        timeout=10,
        server_settings={"search_path": schema},
        reset=None if reset_sessions else _keep_session,
    )
    assert pool is not None
    return pool


async def _keep_session(con: asyncpg.Connection) -> None:
    """A pool's reset that adds nothing to asyncpg's own (rolling back an open transaction)."""
