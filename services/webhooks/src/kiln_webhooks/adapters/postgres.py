"""Endpoints and deliveries in Postgres (schema ``webhooks``). Times are the database's
(``now()``), so replicas never disagree on what has come due."""

from __future__ import annotations

from importlib.resources import files

import asyncpg

from kiln_runtime.db import Migration, create_pool, read_migrations

from .pg_deliveries import PgDeliveries
from .pg_endpoints import PgEndpoints


def migrations() -> list[Migration]:
    """This schema's migrations: ``migrations/NNNN_name.sql`` beside this module."""
    return read_migrations(files("kiln_webhooks.adapters") / "migrations")


class PgStore(PgEndpoints, PgDeliveries):
    """Opened by ``open()`` (the pool, once the schema's migrations are applied)."""

    def __init__(self, url: str, schema: str) -> None:
        self.url = url
        self.schema = schema
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        self._pool = await create_pool(self.url, schema=self.schema, migrations=migrations())

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the webhooks store is not open: call open() first")
        return self._pool

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")
