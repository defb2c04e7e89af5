"""Liveness and readiness: whether a service can do its work, and whether restarting it would help.

A worker service (run by ``kiln_runtime.service.serve``) takes a reading on its event loop every
second (``watch``): has it started consuming, is it connected to NATS, and how is each of its
consume loops doing. A thread of its own serves the latest reading with ``/metrics`` on
``KILN_HEALTH_PORT`` (``serve_http``), so a stuck event loop cannot keep the answer from coming:
a reading older than ``KILN_HEALTH_STALL_S`` is itself a failure (the loop's heartbeat).

``/readyz``: 200 when the service can do its work now — it has started consuming and is not
shutting down, it is connected to NATS, and every consume loop runs and JetStream answers its pull
requests; else 503 with the problems.

``/livez``: 503 only when restarting the process is what it needs — the event loop has not beaten
for ``KILN_HEALTH_STALL_S``, a consume loop that failed (or never came up) has not worked again
for as long, or the NATS connection is closed for good. NATS being unreachable is not one: the
client reconnects by itself, and a restart would not bring NATS back.

The gateway reads the same bus problems (``bus_problems``) in its own ``/readyz`` and ``/healthz``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from .pull import PULL_STALL_S

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class ConsumeLoop(Protocol):
    """What the checks read of one consume loop (``kiln_runtime.pull.Puller``)."""

    up: bool
    failed_at: float | None
    waiting_since: float | None


class BusState(Protocol):
    """What the checks read of the bus (``kiln_runtime.bus.Bus``); times are time.monotonic()."""

    @property
    def draining(self) -> bool: ...
    @property
    def nats_connected(self) -> bool: ...
    @property
    def nats_closed(self) -> bool: ...
    @property
    def connected_at(self) -> float | None: ...
    @property
    def consuming_since(self) -> float | None: ...
    @property
    def pullers(self) -> Mapping[str, ConsumeLoop]: ...


@dataclass(frozen=True)
class Problems:
    not_ready: tuple[str, ...] = ()
    not_live: tuple[str, ...] = ()


def bus_problems(bus: BusState, now: float, stall_s: float) -> Problems:
    """Why the service cannot consume now (not ready), and why it will not again by itself (not
    live)."""
    if bus.draining:  # shutting down on purpose: handlers finish, the loops and connection close
        return Problems(not_ready=("shutting down",))
    not_ready: list[str] = []
    not_live: list[str] = []
    if bus.nats_closed:
        not_ready.append("the NATS connection is closed")
        not_live.append("the NATS connection is closed for good")
    elif not bus.nats_connected:
        not_ready.append("not connected to NATS")
    since = bus.consuming_since
    if since is None:
        not_ready.append("not consuming yet")
        return Problems(tuple(not_ready), tuple(not_live))
    for name, loop in bus.pullers.items():
        if loop.failed_at is not None:
            down = now - loop.failed_at
            not_ready.append(f"consume loop {name} failed {down:.0f}s ago")
            if down > stall_s:
                not_live.append(f"consume loop {name} has not worked for {down:.0f}s")
        elif not loop.up:
            not_ready.append(f"consume loop {name} is not running")
            if now - since > stall_s:
                not_live.append(f"consume loop {name} has not run for {now - since:.0f}s")
        elif loop.waiting_since is not None and bus.nats_connected:
            # measured from the reconnection too: a pull request sent before it was lost
            waited = now - max(loop.waiting_since, bus.connected_at or 0.0)
            if waited > PULL_STALL_S:
                not_ready.append(f"consume loop {name}: no answer from JetStream for {waited:.0f}s")
    return Problems(tuple(not_ready), tuple(not_live))


@dataclass(frozen=True)
class Reading:
    at: float  # time.monotonic() when the event loop took it
    problems: Problems


class Health:
    """The event loop's latest reading (``record``), judged with its age by whoever serves it."""

    def __init__(self, stall_s: float, clock: Clock = time.monotonic) -> None:
        self.stall_s = stall_s
        self.clock = clock
        self.reading = Reading(clock(), Problems(not_ready=("starting",)))

    def record(self, problems: Problems) -> None:
        self.reading = Reading(self.clock(), problems)  # one assignment: the thread sees either

    def _stalled(self, reading: Reading) -> list[str]:
        age = self.clock() - reading.at
        if age > self.stall_s:
            return [f"the event loop has not beaten for {age:.0f}s"]
        return []

    def readiness(self) -> list[str]:
        """The problems that make the service not ready (none: ready)."""
        reading = self.reading
        return self._stalled(reading) + list(reading.problems.not_ready)

    def liveness(self) -> list[str]:
        """The problems that make the service not live (none: live)."""
        reading = self.reading
        return self._stalled(reading) + list(reading.problems.not_live)


async def watch(bus: BusState, health: Health, every_s: float = 1.0) -> None:
    """The heartbeat: record a reading of ``bus`` every ``every_s`` until cancelled."""
    failing = False
    while True:
        try:
            health.record(bus_problems(bus, time.monotonic(), health.stall_s))
            failing = False
        except Exception as err:  # a bug here must not pass for a stuck event loop
            if not failing:
                log.exception("the health check failed")
            failing = True
            health.record(Problems(not_ready=(f"the health check failed: {err}",)))
        await asyncio.sleep(every_s)


# ---------------------------------------------------------------------------- serving


def status_body(problems: Iterable[str], good: str, bad: str) -> tuple[bool, bytes]:
    found = list(problems)
    body = {"status": bad if found else good, "problems": found}
    return not found, json.dumps(body).encode()


def health_app(health: Health) -> Callable[..., Iterable[bytes]]:
    """WSGI: ``/livez`` and ``/readyz`` from ``health``; anything else is the Prometheus metrics."""
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/livez":
            ok, body = status_body(health.liveness(), "live", "not live")
        elif path == "/readyz":
            ok, body = status_body(health.readiness(), "ready", "not ready")
        else:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        start_response(
            "200 OK" if ok else "503 Service Unavailable",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [body]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: no lines
        pass


class HealthServer:
    """``/metrics``, ``/livez`` and ``/readyz`` on ``port``, served from a thread of their own."""

    def __init__(self, port: int, health: Health, host: str = "0.0.0.0") -> None:
        self._httpd = make_server(
            host, port, health_app(health), server_class=_Server, handler_class=_Quiet
        )
        self.port = int(self._httpd.server_port)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="kiln-health", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
