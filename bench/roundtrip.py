"""Tool-call round trip through Kiln vs the raw JetStream floor, measured in the same run.

    uv run --frozen python bench/roundtrip.py [--builds 20] [--calls 25] [--floor 1000]

Kiln: ``python -m kiln_agent`` and ``python -m kiln_sandbox`` (local provider) as processes on a
nats-server and Postgres of the benchmark's own; the model is ``bench/loop_model.py`` in this
process with no latency, answering every turn with one ``list_dir`` of the empty workspace.
``--builds`` builds run one after the other, each making ``--calls`` tool calls; the first call
of each build (which creates the sandbox) is left out. One sample is the time from the ToolCall's
stream timestamp (the server stored it: the agent published it after its checkpoint committed) to
the arrival of the build's next model request (the model server has read its request line): the
sandbox consumes the call, claims it in its ledger, runs list_dir, stores the result and
publishes the ToolResult; the agent consumes it, records it and takes the think lease in one
commit and sends the next request. Bookkeeping on both sides is included; the model is not.
Nothing watches the build while it runs: its end is polled for (one request every 50 ms), its
events and their stream timestamps are read afterwards. ``--synchronous-commit off`` gives the
services Postgres' ``synchronous_commit=off`` in their DATABASE_URL (a commit returns before its
WAL is flushed to disk).

Floor: a bare nats-py JetStream round trip on the same server: publish (PubAck awaited) to a
stream → a durable pull consumer fetches and acks → publish the reply → a second durable pull
consumer fetches and acks; one at a time, timed from the first publish to the reply in hand.

The limit: the floor plus the durable commits the guarantees need on the way, each measured bare
(one statement, autocommit, from asyncpg to the same Postgres, after the Kiln run, on tables of
the bench's own with rows the size of the run's: averages read from the services' tables): the
sandbox's claim (an INSERT into a ledger), its result (an UPDATE of that row with the result),
and the agent's record of the result (an UPDATE of a checkpoint row of the size of the agent's
state and outbox, and the result's turn inserted, in one statement). ``limit_p50_ms`` = floor
p50 + the three commits' p50s; ``ratio_limit_p50`` = Kiln's p50 / that.

Ends with ``roundtrip p50_ms=… p99_ms=… floor_p50_ms=… floor_p99_ms=… ratio_p50=… ratio_p99=…
limit_p50_ms=… ratio_limit_p50=…``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import asyncpg
from _common import Bench, Seen, bench, connect, figures, last_stored, percentile, publish, stored
from loop_model import LoopModel
from nats.aio.client import Client
from nats.js.api import StreamConfig

from kiln_contracts import BuildLimits, BuildRequested, subjects

PAYLOAD = b'{"tool": "list_dir", "input": {"path": "."}, "pad": "' + b"x" * 400 + b'"}'


async def floor(nc_a: Client, nc_b: Client, n: int) -> list[float]:
    """Round trips in milliseconds: A publishes, B consumes and publishes, A consumes."""
    js_a, js_b = nc_a.jetstream(), nc_b.jetstream()
    name = f"FLOOR{uuid.uuid4().hex[:8]}"
    await js_a.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"]))
    ping = await js_b.pull_subscribe(f"{name}.ping", durable=f"{name}-ping")
    pong = await js_a.pull_subscribe(f"{name}.pong", durable=f"{name}-pong")

    async def responder() -> None:
        while True:
            try:
                msgs = await ping.fetch(1, timeout=5)
            except TimeoutError:
                continue
            for m in msgs:
                await m.ack()
                await js_b.publish(
                    f"{name}.pong", m.data, headers={"Nats-Msg-Id": uuid.uuid4().hex}, timeout=10
                )

    task = asyncio.create_task(responder())
    out: list[float] = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            await js_a.publish(
                f"{name}.ping", PAYLOAD, headers={"Nats-Msg-Id": uuid.uuid4().hex}, timeout=10
            )
            (reply,) = await pong.fetch(1, timeout=10)
            await reply.ack()
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        task.cancel()
        await js_a.delete_stream(name)
    return out


async def commits(dsn: str, n: int) -> dict[str, list[float]]:
    """Bare commits (milliseconds) the size of the run's: the ledger's claim and result, the
    agent's checkpoint update with one turn (see the module's docstring)."""
    conn = await asyncpg.connect(dsn)
    try:
        result_chars = await conn.fetchval(
            "SELECT coalesce(avg(length(result::text)), 0)::int FROM sandbox.calls"
        )
        state_chars = await conn.fetchval(
            "SELECT coalesce(avg(length(state::text) + length(outbox::text)), 0)::int"
            " FROM agent.builds"
        )
        turn_chars = await conn.fetchval(
            "SELECT coalesce(avg(length(content::text)), 0)::int FROM agent.turns"
            " WHERE role = 'user'"
        )
        print(
            f"bare commits of: a result of {result_chars} chars, a checkpoint of {state_chars},"
            f" a turn of {turn_chars}"
        )
        schema = f"bench_limit_{uuid.uuid4().hex[:8]}"  # a shared DATABASE_URL may be in use
        await conn.execute(
            f"CREATE SCHEMA {schema}; SET search_path TO {schema};"
            " CREATE TABLE calls (build_id text, call_id text, status text NOT NULL,"
            " result jsonb, PRIMARY KEY (build_id, call_id));"
            " CREATE TABLE builds (build_id text PRIMARY KEY, version int NOT NULL,"
            " state json NOT NULL);"
            " CREATE TABLE turns (build_id text, seq int, content json NOT NULL,"
            " PRIMARY KEY (build_id, seq))"
        )
        result = '{"output": "' + "x" * max(0, result_chars - 14) + '"}'
        state = '{"s": "' + "x" * max(0, state_chars - 9) + '"}'
        turn = '{"t": "' + "x" * max(0, turn_chars - 9) + '"}'
        await conn.execute("INSERT INTO builds VALUES ('b', 1, '{}')")
        out: dict[str, list[float]] = {"claim": [], "result": [], "checkpoint": []}
        for i in range(n):
            t0 = time.perf_counter()
            await conn.execute(
                "INSERT INTO calls (build_id, call_id, status) VALUES ('b', $1, 'started')",
                str(i),
            )
            t1 = time.perf_counter()
            await conn.execute(
                "UPDATE calls SET status = 'done', result = $2::jsonb"
                " WHERE build_id = 'b' AND call_id = $1",
                str(i),
                result,
            )
            t2 = time.perf_counter()
            await conn.execute(
                "WITH u AS (UPDATE builds SET version = version + 1, state = $2::json"
                " WHERE build_id = 'b' RETURNING 1) INSERT INTO turns"
                " SELECT 'b', $1, $3::json WHERE EXISTS (SELECT 1 FROM u)",
                i,
                state,
                turn,
            )
            t3 = time.perf_counter()
            out["claim"].append((t1 - t0) * 1000)
            out["result"].append((t2 - t1) * 1000)
            out["checkpoint"].append((t3 - t2) * 1000)
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        return out
    finally:
        await conn.close()


async def ended(b: Bench, nc: Client, build_id: str, timeout: float) -> Seen:
    """The build's BuildCompleted or BuildFailed, polled for every 50 ms."""
    deadline = time.monotonic() + timeout
    while True:
        for kind in ("build_completed", "build_failed"):
            if (end := await last_stored(nc, subjects.subject(build_id, kind))) is not None:
                return end
        for p in b.processes:
            b.check(p)
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for build {build_id}")
        await asyncio.sleep(0.05)


async def kiln(
    b: Bench, nc: Client, builds: int, calls: int, synchronous_commit: str | None = None
) -> dict[str, list[float]]:
    model = LoopModel(iterations=calls + 1)
    await model.start()
    db = b.urls["DATABASE_URL"]
    if synchronous_commit is not None:  # a server setting in the URL, as an operator would
        db += ("&" if "?" in db else "?") + f"synchronous_commit={synchronous_commit}"
    b.start("sandbox", ["-m", "kiln_sandbox"], DATABASE_URL=db)
    b.start(
        "agent",
        ["-m", "kiln_agent"],
        ANTHROPIC_BASE_URL=model.url,
        ANTHROPIC_API_KEY="bench",
        DATABASE_URL=db,
    )
    out: dict[str, list[float]] = {"roundtrip": [], "sandbox_leg": [], "agent_leg": []}
    try:
        for _ in range(builds):
            build_id = f"rt-{uuid.uuid4().hex[:12]}"
            await publish(
                nc,
                BuildRequested(
                    build_id=build_id,
                    user_id="bench",
                    tier="pro",
                    idea_brief="A benchmark that lists an empty directory.",
                    limits=BuildLimits(max_iterations=calls + 5),
                ),
            )
            # Nothing watches the build while it runs (a live consumer here would take CPU from
            # the services at the very moments measured): its end is polled for, its events
            # and their stream timestamps read afterwards.
            end = await ended(b, nc, build_id, timeout=60 + calls)
            if end.kind != "build_completed":
                raise SystemExit(f"build {build_id} failed: {end.data}")
            seen = await stored(nc, subjects.build_filter(build_id))
            arrivals = [t for _, t in model.arrivals[build_id]]
            tool_calls = sorted((s for s in seen if s.kind == "tool_call"), key=lambda s: s.at)
            results = {s.data["call_id"]: s.at for s in seen if s.kind == "tool_result"}
            for call in tool_calls[1:]:  # the first call also creates the sandbox
                nxt = min(t for t in arrivals if t > call.at)
                res = results[call.data["call_id"]]
                out["roundtrip"].append((nxt - call.at) * 1000)
                out["sandbox_leg"].append((res - call.at) * 1000)
                out["agent_leg"].append((nxt - res) * 1000)
    finally:
        b.stop_all()
        await model.stop()
    return out


async def main(args: argparse.Namespace) -> None:
    with bench("roundtrip") as b:
        nc_a = await connect(b.urls["NATS_URL"])
        nc_b = await connect(b.urls["NATS_URL"])
        try:
            await floor(nc_a, nc_b, 20)  # warm-up
            raw = await floor(nc_a, nc_b, args.floor)
            got = await kiln(b, nc_a, args.builds, args.calls, args.synchronous_commit)
            bare = await commits(b.urls["DATABASE_URL"], args.commits)
        finally:
            await nc_a.close()
            await nc_b.close()
    rt = got["roundtrip"]
    for name, values in (("floor", raw), *got.items(), *bare.items()):
        print(
            f"{name}: n={len(values)} p50={percentile(values, 50):.2f}ms "
            f"p90={percentile(values, 90):.2f}ms p99={percentile(values, 99):.2f}ms "
            f"max={max(values):.2f}ms"
        )
    p50, p99 = percentile(rt, 50), percentile(rt, 99)
    f50, f99 = percentile(raw, 50), percentile(raw, 99)
    limit = f50 + sum(percentile(v, 50) for v in bare.values())
    print(
        figures(
            "roundtrip",
            p50_ms=p50,
            p99_ms=p99,
            floor_p50_ms=f50,
            floor_p99_ms=f99,
            ratio_p50=p50 / f50,
            ratio_p99=p99 / f99,
            limit_p50_ms=limit,
            ratio_limit_p50=p50 / limit,
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=20, help="Builds, one after the other.")
    parser.add_argument("--calls", type=int, default=25, help="Tool calls per build.")
    parser.add_argument("--floor", type=int, default=1000, help="Raw round trips.")
    parser.add_argument("--commits", type=int, default=300, help="Bare commits of each kind.")
    parser.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        help="Postgres' synchronous_commit for the services (given in their DATABASE_URL); "
        "default: the server's (on).",
    )
    asyncio.run(main(parser.parse_args()))
