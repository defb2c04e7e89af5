"""The Postgres ledger of tool calls: claim, release, finish (the exactly-once bookkeeping)."""

from __future__ import annotations

from kiln_runtime.db import create_pool
from kiln_sandbox.adapters.postgres import DDL, SCHEMA, PgCallStore


async def test_claim_release_and_finish(infra, uid):
    pool = await create_pool(infra["DATABASE_URL"], schema=SCHEMA, ddl=DDL)
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
