"""``bench/bookkeeping.py`` at a small size, on this module's own NATS server and database: it
runs a whole build through the real agent and prints its figures in the documented form."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[3] / "bench" / "bookkeeping.py"
LINE = re.compile(
    r"^bookkeeping p50_iter1_ms=(\d+\.\d+) p50_iter200_ms=(\d+\.\d+) ratio=(\d+\.\d+)$"
)


def test_the_bookkeeping_benchmark_runs_a_build_and_prints_its_figures(
    own_nats: str, own_db: str
) -> None:
    args = ["--iterations", "24", "--window", "5", "--builds", "1", "--warmup", "3"]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args],
        env={**os.environ, "NATS_URL": own_nats, "DATABASE_URL": own_db},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    match = LINE.match(lines[-1])
    assert match, lines[-1]
    early, late, ratio = (float(g) for g in match.groups())
    assert early > 0 and late > 0 and ratio == pytest.approx(late / early, abs=0.01)
    assert "build 1: 48 turns stored" in proc.stdout  # the first turn, 23 pairs, the last reply
    assert "early iterations 2-6" in proc.stdout and "late  iterations 19-23" in proc.stdout
    # the ToolCalls go out after the think lease is released: a result never waits for it
    assert "0 ToolResults deferred by a held lease" in proc.stdout
