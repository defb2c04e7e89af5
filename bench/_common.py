"""What the benchmarks share: their own infrastructure, service processes, stream watching and the
way figures are printed. Each benchmark starts its own nats-server (a JetStream stream and durable
consumers of its own, so nothing else's messages mix in) and Postgres, unless NATS_URL /
DATABASE_URL name running ones."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import psutil
from nats.aio.client import Client
from nats.aio.msg import Msg

from kiln_contracts import Envelope, ToolCall, ToolResult, stable_id, subjects
from kiln_devstack.host import Process, spawn, wait_for
from kiln_devstack.infra import Infra
from kiln_runtime.streams import ensure_streams


@dataclass
class Bench:
    """One benchmark's infrastructure and the service processes it started."""

    data_dir: Path
    urls: dict[str, str]
    infra: Infra
    processes: list[Process] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            **self.urls,
            "KILN_SANDBOX_ROOT": str(self.data_dir / "sandboxes"),
            "PYTHONUNBUFFERED": "1",
            **extra,
        }

    def start(self, name: str, args: list[str], **extra: str) -> Process:
        """A process (``python -m kiln_agent`` ...) with the benchmark's URLs in its environment."""
        proc = spawn(name, [sys.executable, *args], self.infra.log_dir, self.env(**extra))
        self.processes.append(proc)
        return proc

    def stop_all(self) -> None:
        """SIGTERM to all at once, then SIGKILL what has not exited within 5 s."""
        live = [p for p in self.processes if p.alive()]
        for proc in live:
            proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in live:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()

    def check(self, proc: Process) -> None:
        if not proc.alive():
            raise SystemExit(f"{proc.name} exited:\n{proc.tail()}")


@contextlib.contextmanager
def bench(name: str) -> Iterator[Bench]:
    # SIGTERM (make's Ctrl-C, a test's timeout) unwinds like Ctrl-C so the services are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    data_dir = Path(tempfile.mkdtemp(prefix=f"kb-{name}-", dir="/tmp"))
    infra = Infra(data_dir)
    b: Bench | None = None
    try:
        urls = {
            "NATS_URL": os.environ.get("NATS_URL") or infra.start_nats(),
            "DATABASE_URL": os.environ.get("DATABASE_URL") or infra.start_postgres(),
        }
        b = Bench(data_dir, urls, infra)
        yield b
    finally:
        if b is not None:
            b.stop_all()
        infra.stop()
        if os.environ.get("KILN_BENCH_KEEP"):
            print(f"kept {data_dir} (logs in {infra.log_dir})", file=sys.stderr)
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


async def connect(url: str) -> Client:
    nc = await nats.connect(url, name="kiln-bench", connect_timeout=5)
    await ensure_streams(nc)
    return nc


async def publish(nc: Client, msg: Envelope) -> None:
    """Publish a contract message as a service does (the event id as Nats-Msg-Id)."""
    await nc.jetstream().publish(
        subjects.subject_of(msg),
        msg.model_dump_json().encode(),
        headers={"Nats-Msg-Id": str(msg.event_id), "Kiln-Kind": msg.kind},
        timeout=10,
    )


async def fake_sandbox(nc: Client, answered: Callable[[ToolCall, Msg], None] | None = None) -> None:
    """A fake sandbox: a push consumer (``bench-fake-sandbox``) answering each ToolCall at once
    with an empty result; ``answered(call, msg)`` after each answer is published, before the ack."""

    async def answer(msg: Msg) -> None:
        call = ToolCall.model_validate_json(msg.data)
        result = call.caused(
            ToolResult, call_id=call.call_id, iteration=call.iteration, output="(empty)"
        ).with_id(stable_id(call.build_id, "tool_result", call.call_id))
        await publish(nc, result)
        if answered is not None:
            answered(call, msg)
        await msg.ack()

    await nc.jetstream().subscribe(
        subjects.kind_filter("tool_call"),
        durable="bench-fake-sandbox",
        cb=answer,
        manual_ack=True,
        pending_msgs_limit=-1,
    )


@dataclass
class Seen:
    build_id: str
    kind: str
    at: float  # the stream's timestamp (epoch seconds): when the server stored the message
    data: dict[str, Any]


async def watch(
    nc: Client, subject: str, on: Callable[[Seen], Awaitable[None] | None] | None = None
) -> list[Seen]:
    """Every message on ``subject`` (an ordered consumer), from the start, as it is stored."""
    seen: list[Seen] = []

    async def cb(msg: Msg) -> None:
        build_id, kind = subjects.parse(msg.subject)
        item = Seen(build_id, kind, msg.metadata.timestamp.timestamp(), json.loads(msg.data))
        seen.append(item)
        if on is not None:
            result = on(item)
            if result is not None:
                await result

    await nc.jetstream().subscribe(subject, ordered_consumer=True, cb=cb)
    return seen


async def stored(nc: Client, subject: str) -> list[Seen]:
    """Every message stored on ``subject`` so far, read once (an ordered consumer, stopped when
    it has caught up): for looking at a run afterwards without watching it while it runs."""
    js = nc.jetstream()
    seen: list[Seen] = []
    sub = await js.subscribe(subject, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except TimeoutError:
                if not seen:
                    break  # nothing stored on it
                raise
            build_id, kind = subjects.parse(msg.subject)
            seen.append(
                Seen(build_id, kind, msg.metadata.timestamp.timestamp(), json.loads(msg.data))
            )
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return seen


async def last_stored(nc: Client, subject: str) -> Seen | None:
    """The last message stored on ``subject`` (one request to the server), or None."""
    try:
        msg = await nc.jetstream().get_last_msg(subjects.STREAM, subject)
    except nats.js.errors.NotFoundError:
        return None
    build_id, kind = subjects.parse(msg.subject or "")
    at = msg.time.timestamp() if msg.time else float("nan")
    return Seen(build_id, kind, at, json.loads(msg.data or b"{}"))


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


def wait_port(url: str) -> None:
    host, _, port = url.rpartition("/")[2].partition(":")
    import socket

    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex((host, int(port))) == 0

    wait_for(up, url)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def kill(proc: Process) -> None:
    """SIGKILL, no goodbye (the process's session: the service runs in its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.popen.pid, signal.SIGKILL)
    proc.popen.wait(10)


def figures(name: str, **values: float | int | str) -> str:
    """The one ``name key=value ...`` line a benchmark ends with."""

    def fmt(v: float | int | str) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    return name + " " + " ".join(f"{k}={fmt(v)}" for k, v in values.items())
