"""Postgres: a schema per service, its numbered migrations applied once, and pools with timeouts.

A service keeps its migrations as package data, ``NNNN_name.sql`` files numbered from 0001 with
no gaps, and passes them to ``create_pool``. ``migrate`` applies, in order, those that the
schema's ``schema_migrations`` table does not record yet, each in its own transaction together
with its record, under an advisory lock on the schema's name, so that replicas starting at once
apply each migration once (the others wait, then find it recorded).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from typing import Any, ParamSpec, TypeVar

import asyncpg

from .retry import retry

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# What a refused, reset or lost connection raises, and what a server shutting down or failing
# over answers (admin or crash shutdown, not accepting connections yet, a standby's read-only
# refusal): a statement worth sending again once the server can be reached.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset; TimeoutError too
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,
    asyncpg.ReadOnlySQLTransactionError,
)

# Tries at a statement that waits out an outage (full-jitter backoff capped at 5 s: about two
# minutes on average).
OUTAGE_ATTEMPTS = 50


def waits_out_outages(
    fn: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """``fn`` (an idempotent store method) sent again while the database cannot be reached, for
    about two minutes (``OUTAGE_ATTEMPTS``), rather than failing: for bookkeeping whose failure
    would cost more than the wait, such as what a tool call records while it runs."""

    @functools.wraps(fn)
    async def patient(*args: P.args, **kwargs: P.kwargs) -> T:
        return await retry(
            lambda: fn(*args, **kwargs),
            attempts=OUTAGE_ATTEMPTS,
            retry_on=CONNECTION_ERRORS,
            base=0.5,
            cap=5.0,
            on_retry=lambda err, n: log.warning(
                "%s: Postgres not reachable (attempt %d): %s; trying again", fn.__qualname__, n, err
            ),
        )

    return patient


_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def read_migrations(directory: Traversable) -> list[Migration]:
    """The ``NNNN_name.sql`` files of ``directory`` in order; numbered 1, 2, 3 ... or an error."""
    found = []
    for entry in directory.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE.fullmatch(entry.name)
        if match is None:
            raise ValueError(f"migration {entry.name!r} is not named NNNN_lower_case_name.sql")
        found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise ValueError(f"migrations in {directory} are not numbered 1 to n: {versions}")
    return found


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def migrate(
    conn: asyncpg.Connection, schema: str, migrations: Sequence[Migration]
) -> list[int]:
    """Apply the ``migrations`` not yet recorded in ``schema``; return the versions applied.

    Leaves no session state behind: the lock is released and ``search_path`` is set only within
    each migration's transaction.
    """
    table = f"{_ident(schema)}.schema_migrations"
    # hashtext(schema), the key every start-up on this schema takes: replicas wait for each other.
    await conn.execute("SELECT pg_advisory_lock(hashtext($1))", schema)
    try:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_ident(schema)}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {table} (version integer PRIMARY KEY, "
            "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        recorded = {row["version"] for row in await conn.fetch(f"SELECT version FROM {table}")}
        applied = []
        for migration in migrations:
            if migration.version in recorded:
                continue
            async with conn.transaction():
                await conn.execute(f"SET LOCAL search_path TO {_ident(schema)}")
                await conn.execute(migration.sql)
                await conn.execute(
                    f"INSERT INTO {table} (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info(
                "schema %s: applied migration %04d_%s", schema, migration.version, migration.name
            )
            applied.append(migration.version)
        unknown = sorted(recorded - {m.version for m in migrations})
        if unknown:
            # A newer release's replicas migrated first (a rolling upgrade); migrations are
            # additive, so this one can run on the schema (docs/OPERATIONS.md, Migrations).
            log.warning("schema %s has migrations this release does not know: %s", schema, unknown)
        return applied
    finally:
        # A connection that broke has lost its session lock already.
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", schema)


async def create_pool(
    url: str,
    *,
    schema: str,
    migrations: Sequence[Migration],
    min_size: int = 1,
    max_size: int = 10,
    reset_sessions: bool = True,
) -> asyncpg.Pool:
    """A pool whose connections use ``schema``, once ``migrations`` are applied to it.

    ``reset_sessions=False`` skips asyncpg's reset query (advisory unlock, CLOSE ALL, UNLISTEN,
    RESET ALL: one more round trip) each time a connection goes back to the pool; an open
    transaction is still rolled back. Only for code that never changes session state.
    """
    admin: asyncpg.Connection = await retry(
        lambda: asyncpg.connect(url, timeout=10),
        attempts=30,
        retry_on=(OSError, asyncpg.PostgresError),
        base=0.2,
        cap=2.0,
        on_retry=lambda err, _: log.warning("Postgres not reachable (%s); retrying", err),
    )
    try:
        await migrate(admin, schema, migrations)
    finally:
        await admin.close()
    pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        command_timeout=30,
        timeout=10,
        server_settings={"search_path": schema, "application_name": f"kiln-{schema}"},
        reset=None if reset_sessions else _keep_session,
    )
    assert pool is not None
    return pool


async def _keep_session(con: asyncpg.Connection) -> None:
    """A pool's reset that adds nothing to asyncpg's own (rolling back an open transaction)."""
