"""Concurrency: one agent process driving many concurrent builds against a slow model.

    uv run --frozen python bench/concurrency.py [--builds 100,300,1000] [--latency-s 1.0]
        [--jitter 0 | --sigma 0] [--measure-s 20]

The default is the stress run: every model call takes 1 s. ``make bench-concurrency-real`` is
the run at a real model's latency: lognormal, median 8 s, shape 0.6 (mean 9.6 s, p99 ~32 s;
tool-using Claude calls take several seconds with a long tail), 1,000 and 5,000 builds.

For each size: a fresh nats-server and Postgres, one ``python -m kiln_agent`` (with
KILN_AGENT_WORKERS = max(128, builds) so that the consumer's worker cap is not what limits it),
``bench/loop_model.py`` as its own process (every reply one ``list_dir`` after ``--latency-s``,
or a latency drawn from ``latency × [1 - jitter, 1 + jitter]``: with all builds requested at
once and a fixed latency, their iterations arrive in waves, one a second),
and a fake sandbox in this process that answers every ToolCall at once (a bare nats-py push
consumer: publish the ToolResult, ack). All builds are requested together; once each has made a model call the window
opens and lasts ``--measure-s``.

* iters_per_s: model replies in the window / its length. ideal_iters_per_s: builds / latency
  (the fake sandbox's tool time is 0), what the model server alone allows.
* overhead_p50/p99_ms: per iteration, from a reply leaving the model server to the same build's
  next request arriving there: the agent's bookkeeping (SDK, checkpoint, outbox, publishes), both
  bus hops and the fake sandbox. 1 s of model time is not in it. A build whose next request has
  not come when the window's figures are read counts with its wait so far, whenever it began
  (``still_waiting``: how many), a lower bound: left out, the longest waits would be missing.
* rss_mb: the agent's peak RSS (psutil, sampled every 0.25 s).
* cpu_ms_per_iter_<role>: user + system CPU seconds of each role's processes in the window
  (psutil ``cpu_times``), per model reply in the window: ``agent``, ``sandbox`` (the fake sandbox:
  this driver process, which does nothing else meanwhile), ``nats``, ``postgres`` (postmaster and
  backends), ``model`` (the stand-in), and ``total``. The model stand-in is a cost of the bench,
  not of Kiln: ``total`` counts it so that nothing is hidden.
* gc_ms_per_iter_agent: of the agent's CPU, the garbage collector's pauses in the window (its
  ``kiln_gc_pause_seconds``, read from its /metrics) per model reply.
* agent_runq_wait_pct: the share of the window in which the agent's event loop (its main thread)
  was ready to run but waiting for a CPU that other processes held (the kernel's run delay,
  ``/proc/<pid>/schedstat``): how far the machine, not the agent, was the limit.
* pg_<count>_per_iter: what reached Postgres in the window, per model reply (its cumulative
  statistics for the bench's database): ``xacts`` (transactions: each autocommit statement is
  one), ``builds_updated`` (checkpoint rows written: saves, lease renewals, outbox clearings),
  ``builds_hot`` (of those, updated in place), ``turns_inserted``. Given a shared DATABASE_URL,
  ``xacts`` counts the database's other clients too.
* overhead by part (printed per size): after_model (reply → ToolCall stored), sandbox (→ ToolResult
  stored), before_model (→ the next request at the model server), p50 / p99 each.

The last line is the last size's: ``concurrency builds=… iters_per_s=… ideal_iters_per_s=…
overhead_p50_ms=… overhead_p99_ms=… rss_mb=… knee_builds=…`` (knee_builds: the largest size that
kept iterations/s within 80% of the ideal).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from _common import (
    Bench,
    bench,
    connect,
    fake_sandbox,
    figures,
    percentile,
    publish,
    rss_mb,
    wait_port,
)
from nats.aio.msg import Msg

from kiln_contracts import BuildLimits, BuildRequested, ToolCall
from kiln_devstack.host import free_port

HERE = Path(__file__).resolve().parent


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as r:
        data: dict[str, Any] = json.loads(r.read())
        return data


async def agent_backends(dsn: str, agent: int) -> list[psutil.Process]:
    """The Postgres backends serving the agent (pg_stat_activity: by the agent's client ports
    over TCP; over a Unix socket, by its application name on the bench's database): what a
    shared Postgres spends on the agent."""
    ports = {c.laddr.port for c in psutil.Process(agent).net_connections(kind="tcp") if c.raddr}
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select pid, client_port from pg_stat_activity"
            " where datname = current_database() and application_name = 'kiln-agent'"
        )
    finally:
        await conn.close()
    return [
        psutil.Process(r["pid"])
        for r in rows
        if r["client_port"] in ports or r["client_port"] in (None, -1)
    ]


async def processes(b: Bench, agent: int, model: int) -> dict[str, list[psutil.Process]]:
    """The processes whose CPU is counted, by role: the agent, the model stand-in, this process
    (the driver, which during the window does nothing but answer as the fake sandbox), the
    bench's nats-server, and Postgres: the bench's own (its postmaster and every process it
    forked: backends, WAL writer, checkpointer) or, given a shared DATABASE_URL, the backends of
    the agent's connections."""
    groups: dict[str, list[psutil.Process]] = {
        "agent": [psutil.Process(agent)],
        "model": [psutil.Process(model)],
        "sandbox": [psutil.Process()],
        "nats": [],
        "postgres": [],
    }
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(b.data_dir) not in cmd:
            continue
        if "nats-server" in cmd:
            groups["nats"].append(p)
        elif "postgres" in (p.info["name"] or "") or "postgres" in cmd.split(" ")[0]:
            with contextlib.suppress(psutil.Error):
                groups["postgres"] += [p, *p.children(recursive=True)]
    if not groups["postgres"]:
        groups["postgres"] = await agent_backends(b.urls["DATABASE_URL"], agent)
    return groups


async def db_counts(dsn: str) -> dict[str, float]:
    """The bench database's statistics so far: transactions (each of the agent's statements is
    one), rows of ``builds`` updated (and of those, updated in place: HOT) and turns inserted
    (Postgres' cumulative statistics: each backend flushes its own within about a second, so
    both ends of a window lag alike)."""
    conn = await asyncpg.connect(dsn)
    try:
        db = await conn.fetchrow(
            "select xact_commit + xact_rollback as xacts from pg_stat_database"
            " where datname = current_database()"
        )
        tables = {
            r["relname"]: r
            for r in await conn.fetch(
                "select relname, n_tup_upd, n_tup_hot_upd, n_tup_ins from pg_stat_user_tables"
                " where schemaname = 'agent' and relname in ('builds', 'turns')"
            )
        }
    finally:
        await conn.close()
    builds, turns = tables.get("builds"), tables.get("turns")
    return {
        "xacts": float(db["xacts"]),
        "builds_updated": float(builds["n_tup_upd"]) if builds else 0.0,
        "builds_hot": float(builds["n_tup_hot_upd"]) if builds else 0.0,
        "turns_inserted": float(turns["n_tup_ins"]) if turns else 0.0,
    }


def cpu_seconds(groups: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """User + system CPU seconds of each group so far (a process gone since counts nothing)."""
    out = {}
    for name, ps in groups.items():
        total = 0.0
        for p in ps:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        out[name] = total
    return out


async def run_size(size: int, args: argparse.Namespace) -> dict[str, Any]:
    with bench("concurrency") as b:
        port = free_port()
        model = b.start(
            "model",
            [
                *(str(HERE / "loop_model.py"), "--port", str(port)),
                *("--latency-s", str(args.latency_s), "--jitter", str(args.jitter)),
                *("--sigma", str(args.sigma)),
            ],
        )
        url = f"http://127.0.0.1:{port}"
        wait_port(url)
        nc = await connect(b.urls["NATS_URL"])

        # per build: (ToolCall stored, ToolResult stored) — stored ≈ the publish's ack
        answered_at: dict[str, list[tuple[float, float]]] = {}

        def answered(call: ToolCall, msg: Msg) -> None:
            answered_at.setdefault(call.build_id, []).append(
                (msg.metadata.timestamp.timestamp(), time.time())
            )

        await fake_sandbox(nc, answered)
        health = free_port()
        agent = b.start(
            "agent",
            ["-m", "kiln_agent"],
            ANTHROPIC_BASE_URL=url,
            ANTHROPIC_API_KEY="bench",
            KILN_AGENT_WORKERS=str(max(128, size)),
            KILN_HEALTH_PORT=str(health),
        )
        peak = 0.0
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                if agent.alive():
                    peak = max(peak, rss_mb(agent.popen.pid))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        try:
            limits = BuildLimits(max_iterations=10_000)
            ids = [f"cc-{uuid.uuid4().hex[:12]}" for _ in range(size)]
            for chunk in range(0, size, 100):
                await asyncio.gather(
                    *(
                        publish(
                            nc,
                            BuildRequested(
                                build_id=i,
                                user_id="bench",
                                tier="pro",
                                idea_brief="x",
                                limits=limits,
                            ),
                        )
                        for i in ids[chunk : chunk + 100]
                    )
                )
            loop = asyncio.get_running_loop()

            def requests() -> int:
                return int(get(url + "/healthz")["requests"])

            async def started() -> bool:
                return await loop.run_in_executor(None, requests) >= size

            deadline = time.monotonic() + 120 + size / 5
            while not await started():
                b.check(agent)
                if time.monotonic() > deadline:
                    raise SystemExit(f"{size} builds did not all start in time")
                await asyncio.sleep(0.5)
            await asyncio.sleep(2 * args.latency_s)  # every build past its first call
            groups = await processes(b, agent.popen.pid, model.popen.pid)
            before = cpu_seconds(groups)
            db_before = await db_counts(b.urls["DATABASE_URL"])
            gc_before = await loop.run_in_executor(None, gc_seconds, health)
            waited_before = run_delay_s(agent.popen.pid)
            t0 = time.time()
            await asyncio.sleep(args.measure_s)
            t1 = time.time()
            waited = run_delay_s(agent.popen.pid) - waited_before
            gc_after = await loop.run_in_executor(None, gc_seconds, health)
            # backends forked during the window count from zero: look for them again
            after_groups = await processes(b, agent.popen.pid, model.popen.pid)
            after = cpu_seconds(after_groups)
            cpu = {k: after[k] - before.get(k, 0.0) for k in after}
            db_after = await db_counts(b.urls["DATABASE_URL"])
            b.check(agent)
            stats = await loop.run_in_executor(None, get, f"{url}/stats/{t0}")
        finally:
            sampling = False
            await sampler
            b.stop_all()
            await nc.close()
    replies = [t for t in stats["replies"] if t0 <= t < t1]
    # a build still waiting for its next request counts with its wait so far (a lower bound):
    # left out, the longest waits of all would be missing from the percentiles
    gaps = stats["gaps_ms"] + stats["waiting_ms"]
    parts = breakdown(stats["gap_spans"], answered_at)
    iterations = max(1, len(replies))
    per_iter = {f"cpu_ms_per_iter_{k}": v * 1000 / iterations for k, v in cpu.items()}
    per_iter["cpu_ms_per_iter_total"] = sum(cpu.values()) * 1000 / iterations
    per_iter["gc_ms_per_iter_agent"] = (gc_after - gc_before) * 1000 / iterations
    db = {k: (db_after[k] - db_before[k]) / iterations for k in db_after}
    return {
        "builds": size,
        "iters_per_s": len(replies) / (t1 - t0),
        "ideal_iters_per_s": size / (stats["mean_latency_s"] or args.latency_s),
        "overhead_p50_ms": percentile(gaps, 50),
        "overhead_p99_ms": percentile(gaps, 99),
        "still_waiting": len(stats["waiting_ms"]),
        "rss_mb": peak,
        **per_iter,
        "agent_runq_wait_pct": waited * 100 / (t1 - t0),
        **{f"pg_{k}_per_iter": v for k, v in db.items()},
        "cpu": cpu,
        "parts": parts,
    }


def run_delay_s(pid: int) -> float:
    """How long the process's main thread (the agent's event loop) has been ready to run but
    waiting for a CPU, in seconds (the kernel's ``/proc/<pid>/schedstat``: run time, run delay,
    timeslices, in ns)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def gc_seconds(port: int) -> float:
    """The agent's garbage collections so far, in seconds of pause (its
    ``kiln_gc_pause_seconds``, every generation)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kiln_gc_pause_seconds_sum")
    )


def breakdown(
    spans: list[tuple[str, float, float]], answered: dict[str, list[tuple[float, float]]]
) -> dict[str, tuple[float, float]]:
    """The overhead split by where it went, (p50, p99) ms each: ``after_model`` from the reply
    leaving the model server to the ToolCall stored in the stream (the agent's bookkeeping after
    the call); ``sandbox`` from there to the ToolResult stored (the fake sandbox's consumer and
    publish); ``before_model`` from there to the next request arriving at the model server (the
    agent's fetch, its bookkeeping before the call, the HTTP send)."""
    out: dict[str, list[float]] = {"after_model": [], "sandbox": [], "before_model": []}
    for build, left, came in spans:
        for stored, done in answered.get(build, []):
            if left <= stored <= came:
                out["after_model"].append((stored - left) * 1000)
                out["sandbox"].append((done - stored) * 1000)
                out["before_model"].append((came - done) * 1000)
                break
    return {k: (percentile(v, 50), percentile(v, 99)) for k, v in out.items()}


def listed(r: dict[str, Any], prefix: str, suffix: str = "") -> str:
    """The figures of ``r`` whose keys start with ``prefix``, named without it (or ``suffix``)."""
    return ", ".join(
        f"{k.removeprefix(prefix).removesuffix(suffix).replace('_', ' ')} {v:.2f}"
        for k, v in r.items()
        if k.startswith(prefix)
    )


async def main(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.builds.split(",")]
    results = []
    for size in sizes:
        r = await run_size(size, args)
        results.append(r)
        share = r["iters_per_s"] / r["ideal_iters_per_s"]
        cpu = " ".join(f"{k}={v / args.measure_s:.0%}" for k, v in r["cpu"].items())
        print(
            f"builds={size}: {r['iters_per_s']:.1f} iterations/s of {r['ideal_iters_per_s']:.0f} "
            f"({share:.0%}), overhead p50 {r['overhead_p50_ms']:.1f} ms p99 "
            f"{r['overhead_p99_ms']:.1f} ms ({r['still_waiting']} still waiting), agent peak "
            f"RSS {r['rss_mb']:.0f} MB; CPU (100% = one core of {psutil.cpu_count()}): {cpu}",
            flush=True,
        )
        print(
            f"  CPU ms per iteration: {listed(r, 'cpu_ms_per_iter_')}; of the agent's, garbage "
            f"collection {r['gc_ms_per_iter_agent']:.2f}; its event loop waited for a CPU "
            f"{r['agent_runq_wait_pct']:.0f}% of the window",
            flush=True,
        )
        print(f"  Postgres per iteration: {listed(r, 'pg_', '_per_iter')}", flush=True)
        print(
            "  overhead by part (p50 / p99 ms): "
            + ", ".join(f"{k} {a:.1f} / {b:.1f}" for k, (a, b) in r["parts"].items()),
            flush=True,
        )
    ok = [r["builds"] for r in results if r["iters_per_s"] >= 0.8 * r["ideal_iters_per_s"]]
    last = results[-1]
    above = [r["builds"] for r in results if r["builds"] not in ok]
    if ok and above:
        print(
            f"knee: between {max(ok)} and {min(b for b in above if b > max(ok)) if any(b > max(ok) for b in above) else '?'} builds"
        )
    print(
        figures(
            "concurrency",
            **{k: v for k, v in last.items() if k not in ("cpu", "parts")},
            knee_builds=max(ok) if ok else 0,
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", default="100,300,1000", help="Sizes, comma-separated.")
    parser.add_argument("--latency-s", type=float, default=1.0, help="Model latency per call.")
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        help="Model latency spread: uniform in latency × [1 - j, 1 + j] (0: every call the same).",
    )
    parser.add_argument(
        "--sigma",
        type=float,
        default=0.0,
        help="Lognormal model latency with median --latency-s and this shape (0: not lognormal).",
    )
    parser.add_argument("--measure-s", type=float, default=20.0, help="The measuring window.")
    asyncio.run(main(parser.parse_args()))
