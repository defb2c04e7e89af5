"""Each benchmark script runs at a tiny size, so that none of them rots. Figures are not checked
(no wall-clock assertions); the properties that do not depend on speed are.

All four together take about a minute on 2 cores (service start-up and shut-down dominate)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run_bench(
    infra: dict[str, str], script: str, *args: str, timeout: float = 90
) -> dict[str, str]:
    """Run bench/<script> (its own nats-server, the session's Postgres); its figures line."""
    return run_bench_lines(infra, script, *args, timeout=timeout)[script.removesuffix(".py")]


def run_bench_lines(
    infra: dict[str, str], script: str, *args: str, timeout: float = 90
) -> dict[str, dict[str, str]]:
    """Run bench/<script>; every ``name key=value …`` line it printed, by name (the last line
    must be one, named like the script)."""
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    env["DATABASE_URL"] = infra["DATABASE_URL"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the script stops the services it started on SIGTERM
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"{script} timed out:\n{out[-3000:]}{err[-3000:]}") from None
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    lines = [line.split() for line in out.strip().splitlines() if line.strip()]
    assert lines[-1][0] == script.removesuffix(".py"), out
    return {
        name: dict(p.split("=", 1) for p in pairs)
        for name, *pairs in lines
        if pairs and all("=" in p for p in pairs)
    }


def test_roundtrip(infra) -> None:
    got = run_bench(infra, "roundtrip.py", "--builds", "1", "--calls", "3", "--floor", "20")
    assert set(got) == {"p50_ms", "p99_ms", "floor_p50_ms", "floor_p99_ms", "ratio_p50",
                        "ratio_p99", "limit_p50_ms", "ratio_limit_p50"}  # fmt: skip
    assert float(got["p50_ms"]) > 0 and float(got["floor_p50_ms"]) > 0
    # the limit is the floor plus three measured commits, and the ratio is against it
    assert float(got["limit_p50_ms"]) > float(got["floor_p50_ms"])
    ratio = float(got["p50_ms"]) / float(got["limit_p50_ms"])
    assert float(got["ratio_limit_p50"]) == pytest.approx(ratio, rel=0.05)


def test_concurrency(infra) -> None:
    got = run_bench(
        infra, "concurrency.py", "--builds", "4", "--latency-s", "0.2", "--sigma", "0.5",
        "--measure-s", "2",
    )  # fmt: skip
    assert got["builds"] == "4"
    assert float(got["iters_per_s"]) > 0
    assert float(got["rss_mb"]) > 0
    assert 0 <= int(got["still_waiting"]) <= 4
    for key in ("ideal_iters_per_s", "overhead_p50_ms", "overhead_p99_ms", "knee_builds"):
        assert key in got
    roles = ("agent", "sandbox", "nats", "postgres", "model")
    cpu = {role: float(got[f"cpu_ms_per_iter_{role}"]) for role in roles}
    assert cpu["agent"] > 0 and cpu["nats"] > 0 and cpu["postgres"] > 0  # each process is found
    assert float(got["cpu_ms_per_iter_total"]) == pytest.approx(sum(cpu.values()), rel=0.05)
    assert float(got["gc_ms_per_iter_agent"]) >= 0  # read from the agent's /metrics
    assert 0 <= float(got["agent_runq_wait_pct"]) <= 100  # read from the kernel's schedstat
    # read from Postgres' statistics: every iteration saves its checkpoint and inserts turns
    assert float(got["pg_xacts_per_iter"]) > 0 and float(got["pg_builds_updated_per_iter"]) > 0
    assert float(got["pg_turns_inserted_per_iter"]) > 0 and "pg_builds_hot_per_iter" in got


def test_sleeping(infra) -> None:
    got = run_bench(infra, "sleeping.py", "--builds", "8", "--warmup", "2")
    assert got["builds"] == "8"
    assert got["sandboxes_alive"] == "0"
    assert int(got["tasks_growth"]) < 8  # no task per sleeping build
    for key in ("rss_growth_mb", "objects_growth", "blocks_growth"):
        assert key in got
    assert float(got["iterations_per_build"]) >= 1  # each slept after its first call or later
    assert float(got["agent_cpu_ms_per_build"]) > 0 and float(got["sandbox_cpu_ms_per_build"]) > 0


def test_recovery(infra) -> None:
    got = run_bench(infra, "recovery.py", "--ack-wait-s", "2", "--latency-s", "0.1")
    assert float(got["seconds"]) > 0
    assert got["ack_wait_s"] == "2"


def test_request_body(infra) -> None:
    got = run_bench(
        infra, "request_body.py", "--iterations", "1,5", "--calls", "5", "--rounds", "1"
    )
    assert set(got) == {"iterations", "kib", "whole_ms", "joined_ms", "ratio"}
    assert got["iterations"] == "5" and float(got["kib"]) > 0
    assert float(got["whole_ms"]) > 0 and float(got["joined_ms"]) > 0


def test_model_client(infra) -> None:
    got = run_bench(
        infra, "model_client.py", "--calls", "50", "--concurrency", "5", "--rounds", "1"
    )
    assert set(got) == {"httpx_cpu_ms", "aiohttp_cpu_ms", "ratio"}
    assert float(got["httpx_cpu_ms"]) > 0 and float(got["aiohttp_cpu_ms"]) > 0


def test_bus_consume_and_publish(infra) -> None:
    lines = run_bench_lines(infra, "bus_consume.py", "--messages", "300", "--rounds", "1")
    for name in ("bus_consume", "bus_publish"):
        got = lines[name]
        assert {"kiln_cpu_us", "bare_cpu_us", "ratio"} <= set(got)
        assert float(got["kiln_cpu_us"]) > 0 and float(got["bare_cpu_us"]) > 0
    # consuming is also measured through FastStream's own subscriber, for the comparison
    consume = lines["bus_consume"]
    assert set(consume) == {
        "kiln_cpu_us",
        "bare_cpu_us",
        "ratio",
        "faststream_cpu_us",
        "faststream_ratio",
    }
    assert float(consume["faststream_cpu_us"]) > 0


def test_overshoot(infra) -> None:
    got = run_bench(
        infra, "overshoot.py", "--builds", "3", "--allowance-calls", "6", "--latency-s", "0.2"
    )
    assert got["builds"] == "3" and got["uncharged_calls"] == "0"
    assert int(got["calls"]) >= int(got["calls_to_allowance"]) >= 1
    for key in ("past_micro_usd", "in_flight_when_spent", "started_in_lag", "charge_lag_ms"):
        assert key in got


def test_long_build(infra) -> None:
    # 60 turns of 4,000-character writes in a 30,000-token window: without clearing old tool
    # inputs and summarising, the build fails with context_window at its ~20th call
    got = run_bench(
        infra, "long_build.py", "--iterations", "60", "--write-chars", "4000", "--window", "30000"
    )
    assert got["completed"] == "true" and got["failed"] == "none", got
    assert got["requests"] == "60"
    summaries = int(got["summaries"])
    assert summaries >= 1 and got["summary_charged"] == got["summaries"]
    assert int(got["compactions"]) >= summaries
    assert 0 < float(got["read_ratio"]) < 1
