"""The Postgres ledger of tool calls (claim, release, finish: the exactly-once bookkeeping) and
the sandbox registry's compare-and-set."""

from __future__ import annotations

from kiln_runtime.db import create_pool
from kiln_sandbox.adapters.postgres import SCHEMA, PgCallStore, PgRegistry, migrations
from kiln_sandbox.ports import SandboxRecord


async def test_claim_release_and_finish(infra, uid):
    pool = await create_pool(infra["DATABASE_URL"], schema=SCHEMA, migrations=migrations())
    calls = PgCallStore(pool)
    build_id = f"b{uid}"
    try:
        assert await calls.claim(build_id, "c1", "replica-1", 30.0) is None  # claimed
        seen = await calls.claim(build_id, "c1", "replica-2", 30.0)  # a second claim loses
        assert seen is not None and seen.status == "started" and seen.owner == "replica-1"
        assert 0 < seen.lease_left_s <= 30

        await calls.release(build_id, "c1", "replica-2")  # not its claim: nothing happens
        assert (await calls.get(build_id, "c1")) is not None
        await calls.release(build_id, "c1", "replica-1")  # given back: free to claim again
        assert await calls.get(build_id, "c1") is None
        assert await calls.claim(build_id, "c1", "replica-2", 30.0) is None

        await calls.finish(build_id, "c1", {"output": "ok"})
        await calls.release(build_id, "c1", "replica-2")  # a finished call is never released
        done = await calls.claim(build_id, "c1", "replica-1", 30.0)
        assert done is not None and done.status == "done" and done.result == {"output": "ok"}
    finally:
        await pool.close()


async def test_the_registry_keeps_the_sandbox_recorded_first(infra, uid):
    pool = await create_pool(infra["DATABASE_URL"], schema=SCHEMA, migrations=migrations())
    registry = PgRegistry(pool)
    build_id = f"b{uid}"
    try:
        first = SandboxRecord(build_id, "e2b", "sb-1", "running")
        assert await registry.replace(first, expected=None) == first
        late = SandboxRecord(build_id, "e2b", "sb-2", "running")
        assert await registry.replace(late, expected=None) == first  # made meanwhile: loses
        await registry.put(SandboxRecord(build_id, "e2b", "sb-1", "paused"))
        fresh = SandboxRecord(build_id, "e2b", "sb-3", "running")  # sb-1 vanished: replaced
        assert await registry.replace(fresh, expected="sb-1") == fresh
        stale = SandboxRecord(build_id, "e2b", "sb-4", "running")  # replacing sb-1 again: too late
        assert await registry.replace(stale, expected="sb-1") == fresh
        assert await registry.get(build_id) == fresh
    finally:
        await pool.close()
