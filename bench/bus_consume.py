"""CPU per message of Kiln's consume and publish paths, against bare nats-py doing the same.

    uv run --frozen python bench/bus_consume.py [--messages 20000] [--rounds 3]
        [--baseline-rev REV]

A nats-server of its own (or ``NATS_URL``). ``--messages`` ToolResults (one per build, a few
hundred bytes each) are published to Kiln's stream once, then consumed whole by a new durable
consumer ``--rounds`` times each way, alternating, each in a fresh process that does nothing
else:

* **kiln**: ``Bus.consume(ToolResult, handler, max_workers=128)`` with a handler that only counts
  (the real path: Kiln's pull loop, the contract's validation, the consumer span, metrics, the
  heartbeat task, the ack);
* **faststream**: the same handler behind the same wrapper (validation, span, metrics, heartbeat,
  ack), delivered by FastStream's public API instead of Kiln's pull loop: a ``NatsBroker``
  subscriber with ``PullSub(batch_size=128)``, ``AckPolicy.MANUAL``, the wrapper called on
  ``msg.raw_message``, its per-message log lines at debug level;
* **bare**: a nats-py pull subscription fetching batches of 128 and acking each message (no
  parsing: the floor of consuming from JetStream in Python).

CPU = the consuming process's CPU time from its first pull to the last ack / messages.

Publishing the same way: ``--messages`` ToolResults published one after the other, each PubAck
awaited (as a handler does), by a fresh process each round: **kiln** = ``Bus.publish`` (the
producer span, the trace headers, the event id as ``Nats-Msg-Id``, metrics), **bare** = nats-py's
``js.publish`` with the same subject, body and ``Nats-Msg-Id``. CPU = the publishing process's
CPU time / messages.

``--baseline-rev REV`` adds a third way to both: Kiln's path as of git revision REV (its
``libs/kiln-runtime/src`` put first on the path). The last two lines:
``bus_publish kiln_cpu_us=… bare_cpu_us=… ratio=…`` and
``bus_consume kiln_cpu_us=… bare_cpu_us=… ratio=… faststream_cpu_us=… faststream_ratio=…``
(medians; ratio = kiln / bare, faststream_ratio = faststream / kiln), plus
``baseline_cpu_us=… baseline_ratio=…`` (baseline / kiln) with ``--baseline-rev``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DURABLE = "bench-bus"


async def publish_all(url: str, n: int) -> None:
    sys.path.insert(0, str(HERE))
    from _common import connect, publish

    from kiln_contracts import ToolResult

    nc = await connect(url)
    gate = asyncio.Semaphore(256)

    async def one(i: int) -> None:
        async with gate:
            await publish(
                nc,
                ToolResult(
                    build_id=f"bus{i}", user_id="u", call_id=f"c{i}", iteration=1,
                    output="x" * 200, duration_ms=3,
                ),
            )  # fmt: skip

    await asyncio.gather(*(one(i) for i in range(n)))
    await nc.drain()


def counting(n: int) -> tuple[Callable[[Any, Any], Awaitable[None]], asyncio.Event]:
    """A handler that counts the messages it is given, and the event set at the ``n``-th."""
    done = asyncio.Event()
    count = 0

    async def handler(msg: Any, delivery: Any) -> None:
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    return handler, done


async def consume_kiln(url: str, n: int, durable: str) -> float:
    from kiln_contracts import ToolResult
    from kiln_runtime.bus import Bus
    from kiln_runtime.settings import CommonSettings

    handler, done = counting(n)

    bus = Bus(CommonSettings(nats_url=url), "benchbus")
    bus.consume(ToolResult, handler, durable=durable, max_workers=128)
    await bus.connect()
    began = time.process_time()
    await bus.start()
    await done.wait()
    spent = time.process_time() - began
    await bus.stop()
    return spent


async def consume_faststream(url: str, n: int, durable: str) -> float:
    from faststream import AckPolicy
    from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub

    from kiln_contracts import ToolResult, subjects
    from kiln_runtime.bus import Bus
    from kiln_runtime.consume import Consumer
    from kiln_runtime.settings import CommonSettings

    handler, done = counting(n)

    bus = Bus(CommonSettings(nats_url=url), "benchbus")
    consumer = Consumer(bus, ToolResult, handler)
    # its per-message "Received/Processed" lines at debug level, as a service would set it
    broker = NatsBroker(url, logger=logging.getLogger("faststream.bench"), log_level=logging.DEBUG)

    @broker.subscriber(
        subjects.kind_filter(ToolResult.kind),
        stream=JStream(subjects.STREAM, declare=False),
        durable=durable,
        pull_sub=PullSub(batch_size=128, timeout=5),
        ack_policy=AckPolicy.MANUAL,
    )
    async def on_message(msg: NatsMessage) -> None:
        await consumer(msg.raw_message)

    await bus.connect()
    await broker.connect()
    began = time.process_time()
    await broker.start()
    await done.wait()
    spent = time.process_time() - began
    await broker.stop()
    await bus.stop()
    return spent


async def consume_bare(url: str, n: int, durable: str) -> float:
    import nats

    nc = await nats.connect(url)
    sub = await nc.jetstream().pull_subscribe("kiln.build.*.tool_result", durable=durable)
    began = time.process_time()
    count = 0
    while count < n:
        for msg in await sub.fetch(128, timeout=5):
            await msg.ack()
            count += 1
    spent = time.process_time() - began
    await nc.drain()
    return spent


def _results(n: int) -> list:  # type: ignore[type-arg]
    from kiln_contracts import ToolResult

    return [
        ToolResult(
            build_id=f"pub{i}", user_id="u", call_id=f"c{i}", iteration=1,
            output="x" * 200, duration_ms=3,
        )
        for i in range(n)
    ]  # fmt: skip


async def publish_kiln(url: str, n: int) -> float:
    from kiln_runtime.bus import Bus
    from kiln_runtime.settings import CommonSettings

    bus = Bus(CommonSettings(nats_url=url), "benchbus")
    await bus.connect()
    messages = _results(n)
    began = time.process_time()
    for msg in messages:
        await bus.publish(msg)
    spent = time.process_time() - began
    await bus.stop()
    return spent


async def publish_bare(url: str, n: int) -> float:
    import nats

    from kiln_contracts import subjects

    nc = await nats.connect(url)
    js = nc.jetstream()
    messages = _results(n)
    began = time.process_time()
    for msg in messages:
        await js.publish(
            subjects.subject_of(msg),
            msg.model_dump_json().encode(),
            headers={"Nats-Msg-Id": str(msg.event_id)},
            timeout=10,
        )
    spent = time.process_time() - began
    await nc.drain()
    return spent


def run_one(url: str, way: str, n: int, durable: str, pythonpath: str | None) -> float:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    action, _, way = way.partition(":")  # "consume:kiln", "publish:bare" ...
    out = subprocess.run(
        [sys.executable, __file__, f"--{action}", way, "--url", url, "--messages", str(n),
         "--durable", durable],
        env=env, capture_output=True, text=True, check=True, timeout=600,
    ).stdout  # fmt: skip
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-rev", default=None)
    parser.add_argument("--consume", choices=("kiln", "faststream", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--publish", choices=("kiln", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--durable", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consume:  # a child: consume and print the CPU seconds
        consume = {"kiln": consume_kiln, "faststream": consume_faststream, "bare": consume_bare}[
            args.consume
        ]
        print(asyncio.run(consume(args.url, args.messages, args.durable)))
        return
    if args.publish:  # a child: publish and print the CPU seconds
        send = publish_kiln if args.publish == "kiln" else publish_bare
        print(asyncio.run(send(args.url, args.messages)))
        return

    sys.path.insert(0, str(HERE))
    from _common import bench

    with bench("bus") as b, tempfile.TemporaryDirectory() as tmp:
        url = b.urls["NATS_URL"]
        ways: dict[str, str | None] = {"kiln": None, "bare": None}
        if args.baseline_rev:
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.baseline_rev, "libs/kiln-runtime/src"],
                capture_output=True, check=True,
            ).stdout  # fmt: skip
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            ways["baseline"] = str(Path(tmp) / "libs/kiln-runtime/src")
        asyncio.run(publish_all(url, args.messages))  # each consumer below reads them all
        lines = []
        for action in ("publish", "consume"):
            these = dict(ways)
            if action == "consume":
                these["faststream"] = None
            cpu: dict[str, list[float]] = {way: [] for way in these}
            for r in range(args.rounds):
                for way, path in these.items():
                    durable = f"{DURABLE}-{way}-{r}"
                    code = f"{action}:{way if way in ('bare', 'faststream') else 'kiln'}"
                    spent = run_one(url, code, args.messages, durable, path)
                    cpu[way].append(spent / args.messages * 1e6)
                    print(
                        f"{action} round {r + 1} {way}: {cpu[way][-1]:.1f} µs CPU per message",
                        flush=True,
                    )
            lines.append(summary(f"bus_{action}", cpu))
    print("\n".join(lines))


def summary(name: str, cpu: dict[str, list[float]]) -> str:
    med = {way: statistics.median(v) for way, v in cpu.items()}
    line = (
        f"{name} kiln_cpu_us={med['kiln']:.1f} bare_cpu_us={med['bare']:.1f} "
        f"ratio={med['kiln'] / med['bare']:.2f}"
    )
    if "faststream" in med:
        line += (
            f" faststream_cpu_us={med['faststream']:.1f} "
            f"faststream_ratio={med['faststream'] / med['kiln']:.2f}"
        )
    if "baseline" in med:
        line += (
            f" baseline_cpu_us={med['baseline']:.1f} "
            f"baseline_ratio={med['baseline'] / med['kiln']:.2f}"
        )
    return line


if __name__ == "__main__":
    main()
