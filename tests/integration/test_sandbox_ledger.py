"""The Postgres ledger of tool calls (claim, release, finish: the exactly-once bookkeeping), the
sandbox registry's compare-and-set, the background processes' table and the read log, whose
statements wait out a database outage."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from kiln_devstack.outage import forwarded
from kiln_runtime.db import create_pool
from kiln_sandbox.adapters.pg_processes import PgProcesses
from kiln_sandbox.adapters.postgres import SCHEMA, PgCallStore, PgReads, PgRegistry, migrations
from kiln_sandbox.records import SandboxRecord


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


async def test_processes_are_numbered_per_build_once_per_call_and_reported_once(infra, uid):
    pool = await create_pool(infra["DATABASE_URL"], schema=SCHEMA, migrations=migrations())
    store, registry = PgProcesses(pool), PgRegistry(pool)
    build_id = f"b{uid}"
    try:
        one, new = await store.register(build_id, "c1", 1, "npm run dev", "sb-1")
        assert new and one.process_id == "bash_1" and one.status == "starting"
        again, new = await store.register(build_id, "c1", 1, "npm run dev", "sb-1")
        assert not new and again == one  # a redelivered call: the same process
        # two calls at once get two numbers
        got = await asyncio.gather(
            *(store.register(build_id, f"c{i}", 1, "sleep 1", "sb-1") for i in range(2, 7))
        )
        assert sorted(r.process_id for r, _ in got) == [f"bash_{i}" for i in range(2, 7)]
        assert (await store.register(f"x{uid}", "c1", 1, "x", "sb-9"))[0].process_id == "bash_1"

        running = replace(one, status="running", pid=42, read_offset=10, ports=(5173, 8000))
        await store.update(running)
        assert await store.get(build_id, "bash_1") == running
        await store.update(replace(one, status="stopped", reason="build sleeping"))
        lost, ended = await store.to_report(build_id, "sb-2", "c9")
        assert sorted(r.process_id for r in lost) == [f"bash_{i}" for i in range(2, 7)]
        assert [r.process_id for r in ended] == [f"bash_{i}" for i in range(1, 7)]
        assert {r.status for r in ended} == {"stopped", "lost"}
        assert await store.to_report(build_id, "sb-2", "c10") == ([], [])  # told once
        assert (await store.by_call(build_id, "c1")).reported_by == "c9"  # type: ignore[union-attr]

        await registry.put(SandboxRecord(build_id, "e2b", "sb-1", "running"))
        await registry.mark_processes(build_id)
        await registry.put(SandboxRecord(build_id, "e2b", "sb-1", "paused"))  # kept by a put
        fresh = SandboxRecord(build_id, "e2b", "sb-2", "running")
        assert await registry.replace(fresh, expected="sb-1") == fresh
        held = await registry.get(build_id)
        assert held is not None and held.has_processes and held.sandbox_id == "sb-2"
    finally:
        await pool.close()


async def test_a_read_counts_once_its_call_has_a_result(infra, uid):
    pool = await create_pool(infra["DATABASE_URL"], schema=SCHEMA, migrations=migrations())
    reads, calls = PgReads(pool), PgCallStore(pool)
    build_id = f"b{uid}"
    try:
        assert await calls.claim(build_id, "r1", "replica", 30.0) is None
        await reads.saw(build_id, "app.py", "a" * 64, "r1")
        assert await reads.last_seen(build_id, "app.py") is None  # still running: not seen
        await calls.finish(build_id, "r1", {"output": "...", "is_error": False})
        assert await reads.last_seen(build_id, "app.py") == "a" * 64
        # a read whose call came back interrupted was never seen by the model
        assert await calls.claim(build_id, "r2", "replica", 30.0) is None
        await reads.saw(build_id, "app.py", "b" * 64, "r2")
        await calls.finish(build_id, "r2", {"output": "interrupted", "is_error": True})
        assert await reads.last_seen(build_id, "app.py") is None
        assert await reads.last_seen(build_id, "other.py") is None
    finally:
        await pool.close()


async def test_what_a_tool_records_while_it_runs_waits_out_an_outage(infra, uid):
    """A tool that ran must not fail on its bookkeeping (its call would come back interrupted):
    the read log's, the process table's and the result's statements wait for the database."""
    forwarder, url = forwarded(infra["DATABASE_URL"])
    pool = await create_pool(url, schema=SCHEMA, migrations=migrations())
    reads, calls, processes = PgReads(pool), PgCallStore(pool), PgProcesses(pool)
    build_id = f"b{uid}"
    try:
        assert await calls.claim(build_id, "w1", "replica", 30.0) is None
        await asyncio.to_thread(forwarder.down)  # open connections reset, new ones refused
        saw = asyncio.create_task(reads.saw(build_id, "app.py", "a" * 64, "w1"))
        started = asyncio.create_task(processes.register(build_id, "w1", 1, "serve", "sbx-1"))
        await asyncio.sleep(1.5)
        assert not saw.done() and not started.done()  # waiting, not failed
        await asyncio.to_thread(forwarder.up)
        await asyncio.wait_for(saw, 60)
        record, new = await asyncio.wait_for(started, 60)
        assert new and record.process_id == "bash_1" and record.call_id == "w1"
        await asyncio.to_thread(forwarder.down)  # and its result, stored after it ran
        finished = asyncio.create_task(
            calls.finish(build_id, "w1", {"output": "written", "is_error": False})
        )
        await asyncio.sleep(1.5)
        assert not finished.done()
        await asyncio.to_thread(forwarder.up)
        await asyncio.wait_for(finished, 60)
        assert await reads.last_seen(build_id, "app.py") == "a" * 64
    finally:
        await pool.close()
        forwarder.stop()
