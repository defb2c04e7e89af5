"""Numbered migrations on a real Postgres: each applied once, in order, and recorded, however many
replicas start at once; a schema the services made before migrations were recorded upgrades."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from kiln_agent.adapters import postgres as agent_pg
from kiln_gateway.adapters import postgres as gateway_pg
from kiln_runtime.db import Migration, create_pool, migrate
from kiln_sandbox.adapters import postgres as sandbox_pg
from tests.integration import schemas_before_migrations as before


class Service:
    def __init__(
        self,
        migrations: Callable[[], list[Migration]],
        ddl_before: str,
        table: str,
        row: str,
    ) -> None:
        self.migrations = migrations
        self.ddl_before = ddl_before
        self.table = table  # one of its tables, and a row of it
        self.row = row


SERVICES = {
    "agent": Service(
        agent_pg.migrations,
        before.AGENT,
        "turns",
        """INSERT INTO turns (build_id, seq, role, content) VALUES ('b1', 0, 'user', '{"b": 1, "a": 2}')""",
    ),
    "gateway": Service(
        gateway_pg.migrations,
        before.GATEWAY,
        "api_keys",
        "INSERT INTO api_keys (key_sha256, key_id, user_id, tier) VALUES ('k', 'k', 'u1', 'pro')",
    ),
    "sandbox": Service(
        sandbox_pg.migrations,
        before.SANDBOX,
        "sandboxes",
        "INSERT INTO sandboxes (build_id, provider, sandbox_id, state) "
        "VALUES ('b1', 'local', 's1', 'running')",
    ),
}


@pytest.fixture
async def conn(infra: dict[str, str]) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(infra["DATABASE_URL"])
    yield c
    await c.close()


@pytest.fixture
async def schemas(conn: asyncpg.Connection, uid: str) -> AsyncIterator[Callable[[str], str]]:
    """Names of schemas of this test's own, dropped at its end."""
    made: list[str] = []

    def name(label: str) -> str:
        made.append(f"m_{label}_{uid}")
        return made[-1]

    yield name
    for schema in made:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def catalog(conn: asyncpg.Connection, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """What the schema is made of, with its own name left out (to compare two schemas)."""

    def rows(records: list[asyncpg.Record]) -> list[tuple[Any, ...]]:
        return [tuple(str(v).replace(f"{schema}.", "") for v in r.values()) for r in records]

    return {
        "columns": rows(
            await conn.fetch(
                "SELECT table_name, column_name, data_type, is_nullable, column_default "
                "FROM information_schema.columns WHERE table_schema = $1 ORDER BY 1, 2",
                schema,
            )
        ),
        "indexes": rows(
            await conn.fetch(
                "SELECT tablename, indexname, indexdef FROM pg_indexes "
                "WHERE schemaname = $1 ORDER BY 1, 2",
                schema,
            )
        ),
        "constraints": rows(
            await conn.fetch(
                "SELECT t.relname, c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint c "
                "JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace "
                "WHERE n.nspname = $1 ORDER BY 1, 2",
                schema,
            )
        ),
    }


async def recorded(conn: asyncpg.Connection, schema: str) -> list[tuple[Any, ...]]:
    rows = await conn.fetch(
        f'SELECT version, name, applied_at FROM "{schema}".schema_migrations ORDER BY version'
    )
    return [tuple(r.values()) for r in rows]


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_applying_twice_changes_nothing(conn, schemas, service):
    schema = schemas(service)
    migrations = SERVICES[service].migrations()
    assert await migrate(conn, schema, migrations) == [m.version for m in migrations]
    made, first = await catalog(conn, schema), await recorded(conn, schema)
    assert [(v, n) for v, n, _ in first] == [(m.version, m.name) for m in migrations]

    assert await migrate(conn, schema, migrations) == []
    assert await catalog(conn, schema) == made
    assert await recorded(conn, schema) == first


async def test_concurrent_runners_apply_each_migration_once(infra, conn, schemas):
    schema = schemas("race")
    # Neither migration may run twice: the table exists after the first, the row is logged.
    migrations = [
        Migration(
            1, "log", "CREATE TABLE log (version integer, at timestamptz DEFAULT clock_timestamp())"
        ),
        Migration(2, "slow", "SELECT pg_sleep(0.3); INSERT INTO log (version) VALUES (2)"),
        Migration(3, "after", "INSERT INTO log (version) VALUES (3)"),
    ]
    runners = [await asyncpg.connect(infra["DATABASE_URL"]) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(r, schema, migrations) for r in runners))
    finally:
        for r in runners:
            await r.close()
    assert sorted(results) == [[], [], [], [1, 2, 3]]
    logged = await conn.fetch(f'SELECT version FROM "{schema}".log ORDER BY at')
    assert [r["version"] for r in logged] == [2, 3]
    assert [v for v, _, _ in await recorded(conn, schema)] == [1, 2, 3]


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_replicas_starting_at_once_each_get_a_pool(infra, conn, schemas, service):
    schema = schemas(service)
    migrations = SERVICES[service].migrations()
    pools = await asyncio.gather(
        *(
            create_pool(infra["DATABASE_URL"], schema=schema, migrations=migrations, max_size=2)
            for _ in range(3)
        )
    )
    try:
        for pool in pools:  # each on the schema
            assert await pool.fetchval(f"SELECT count(*) FROM {SERVICES[service].table}") == 0
    finally:
        for pool in pools:
            await pool.close()
    assert [v for v, _, _ in await recorded(conn, schema)] == [m.version for m in migrations]


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_a_schema_made_before_migrations_were_recorded_upgrades(
    infra, conn, schemas, service
):
    spec = SERVICES[service]
    old, fresh = schemas(f"{service}_old"), schemas(f"{service}_new")
    async with conn.transaction():  # as the services made it at each start
        await conn.execute(f'CREATE SCHEMA "{old}"')
        await conn.execute(f'SET LOCAL search_path TO "{old}"')
        await conn.execute(spec.ddl_before)
        await conn.execute(spec.ddl_before)
        await conn.execute(spec.row)

    migrations = spec.migrations()
    pool = await create_pool(infra["DATABASE_URL"], schema=old, migrations=migrations)
    try:
        assert await pool.fetchval(f"SELECT count(*) FROM {spec.table}") == 1  # the row kept
    finally:
        await pool.close()
    assert [v for v, _, _ in await recorded(conn, old)] == [m.version for m in migrations]
    await migrate(conn, fresh, migrations)
    assert await catalog(conn, old) == await catalog(conn, fresh)


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_a_migration_added_later_is_applied_once(conn, schemas, service):
    spec = SERVICES[service]
    schema = schemas(service)
    migrations = spec.migrations()
    await migrate(conn, schema, migrations)
    # Not idempotent: applied a second time, it would fail.
    later = [
        *migrations,
        Migration(
            len(migrations) + 1, "add_note", f"ALTER TABLE {spec.table} ADD COLUMN note text"
        ),
    ]
    assert await migrate(conn, schema, later) == [len(later)]
    assert await migrate(conn, schema, later) == []
    assert [(v, n) for v, n, _ in await recorded(conn, schema)][-1] == (len(later), "add_note")
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_schema = $1 AND table_name = $2 AND column_name = 'note'",
            schema,
            spec.table,
        )
        == 1
    )


async def test_a_failing_migration_is_rolled_back_and_stops_the_run(infra, conn, schemas):
    schema = schemas("fail")
    first = Migration(1, "t", "CREATE TABLE t (id integer)")
    last = Migration(3, "u", "CREATE TABLE u (id integer)")
    broken = Migration(2, "x", "ALTER TABLE t ADD COLUMN x text; SELECT 1 / 0")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate(conn, schema, [first, broken, last])
    assert [v for v, _, _ in await recorded(conn, schema)] == [1]
    assert await conn.fetchval("SELECT to_regclass($1)", f"{schema}.u") is None
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_schema = $1 AND column_name = 'x'",
            schema,
        )
        == 0
    )

    # The lock was given back: another replica, with the migration fixed, goes on from there.
    fixed = Migration(2, "x", "ALTER TABLE t ADD COLUMN x text")
    other = await asyncpg.connect(infra["DATABASE_URL"])
    try:
        assert await asyncio.wait_for(migrate(other, schema, [first, fixed, last]), 10) == [2, 3]
    finally:
        await other.close()
