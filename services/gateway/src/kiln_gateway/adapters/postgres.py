"""The gateway's store in Postgres (schema ``gateway``): one class over the pool, its tables in
a module each (``pg_keys``, ``pg_projects``, ``pg_builds``, ``pg_messages``; rows in ``pg_rows``)."""

from __future__ import annotations

from importlib.resources import files

import asyncpg

from kiln_runtime.db import Migration, read_migrations

from .pg_builds import PgBuilds
from .pg_keys import PgKeys
from .pg_messages import PgMessages
from .pg_projects import PgProjects


def migrations() -> list[Migration]:
    """This schema's migrations: ``migrations/NNNN_name.sql`` beside this module."""
    return read_migrations(files("kiln_gateway.adapters") / "migrations")


class PgStore(PgKeys, PgProjects, PgBuilds, PgMessages):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1", timeout=2)
