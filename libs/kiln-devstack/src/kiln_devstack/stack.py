"""The whole local stack: the infrastructure, then the six services, each its own process."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .host import InfraError, Process, free_port, port_in_use, reserve_port, spawn, wait_for
from .infra import Infra, set_up_streams

SERVICES = ("gateway", "agent", "sandbox", "budget", "snapshot", "webhooks")
DEV_API_KEY = "kiln_dev_key_local_only"
DEV_USER = "dev"


@dataclass
class Stack:
    data_dir: Path
    gateway_port: int = 8080
    nats_port: int = 0
    nats_nodes: int = 1  # 3: a JetStream cluster on loopback, streams at three replicas
    replicas: int = 1  # processes of each service (names: agent, agent-2, ...)
    extra_env: dict[str, str] = field(default_factory=dict)
    infra: Infra = field(init=False)
    services: dict[str, Process] = field(default_factory=dict)
    model_server: Process | None = None
    e2b_server: Process | None = None
    env: dict[str, str] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    gateway_ports: dict[str, int] = field(default_factory=dict)  # replicas after the first

    def __post_init__(self) -> None:
        self.infra = Infra(self.data_dir, nats_port=self.nats_port, nats_nodes=self.nats_nodes)
        reserve_port(self.gateway_port)  # never handed to another part of this stack

    @property
    def gateway_urls(self) -> list[str]:
        """Every gateway replica's URL, the first one's first."""
        ports = [self.gateway_port, *self.gateway_ports.values()]
        return [f"http://127.0.0.1:{p}" for p in ports]

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def metrics_url(self, name: str) -> str:
        if name == "gateway":
            return f"{self.gateway_url}/metrics"
        return f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"

    def start(self, services: tuple[str, ...] = SERVICES) -> None:
        try:
            if "gateway" in services and port_in_use(self.gateway_port):
                raise InfraError(
                    f"port {self.gateway_port} for the gateway is in use; pick another with --port"
                )
            base = {**os.environ, **self.extra_env}
            urls = self.infra.start(base)
            if base.get("NATS_URL"):  # a server of the user's: the set-up step as its user
                replicas = int(base.get("KILN_STREAM_REPLICAS") or "1")
                setup_env = {
                    k[len("KILN_SETUP_") :]: v
                    for k, v in base.items()
                    if k in ("KILN_SETUP_NATS_USER", "KILN_SETUP_NATS_PASSWORD")
                }
                set_up_streams(base["NATS_URL"], replicas, self.infra.log_dir, setup_env)
            self.env = {
                **base,
                **urls,
                "KILN_DATA_DIR": str(self.data_dir),
                "KILN_SANDBOX_ROOT": str(self.data_dir / "sandboxes"),
                "KILN_GATEWAY_PORT": str(self.gateway_port),
                "KILN_DEV_API_KEY": base.get("KILN_DEV_API_KEY", DEV_API_KEY),
                "KILN_DEV_USER": base.get("KILN_DEV_USER", DEV_USER),
                "PYTHONUNBUFFERED": "1",
                "KILN_STREAM_REPLICAS": base.get(
                    "KILN_STREAM_REPLICAS", str(min(3, self.nats_nodes))
                ),
                # A local stack's webhooks may go to receivers on this machine, over http.
                "KILN_WEBHOOKS_ALLOW_HTTP": base.get("KILN_WEBHOOKS_ALLOW_HTTP", "true"),
                "KILN_WEBHOOKS_ALLOWED_NETWORKS": base.get(
                    "KILN_WEBHOOKS_ALLOWED_NETWORKS", "127.0.0.1/32,::1/128"
                ),
            }
            if not base.get("ANTHROPIC_API_KEY"):
                self._start_model_server()
            if base.get("KILN_SANDBOX_PROVIDER") == "e2b" and not base.get("E2B_API_KEY"):
                self._start_e2b_server()
            for name in services:
                for n in range(self.replicas):
                    self.start_service(name if n == 0 else f"{name}-{n + 1}")
            if "gateway" in services:
                self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def _start_model_server(self) -> None:
        port = free_port()
        self.model_server = spawn(
            "scripted-model",
            [
                *(sys.executable, "-m", "kiln_devstack.model.server", "--port", str(port)),
                # seconds per model call (tests that need builds to take a while)
                *("--latency-s", self.env.get("KILN_SCRIPTED_LATENCY_S", "0")),
            ],
            self.infra.log_dir,
            env=self.env,
        )
        wait_for(lambda: port_in_use(port), "scripted model server")
        self.env["ANTHROPIC_BASE_URL"] = f"http://127.0.0.1:{port}"
        self.env["ANTHROPIC_API_KEY"] = "scripted-local"

    def _start_e2b_server(self) -> None:
        """Provider e2b without an E2B key: the real SDK against the local E2B-compatible
        server (kiln_devstack.e2b_server), pointed there by the SDK's own settings."""
        port = free_port()
        self.e2b_server = spawn(
            "e2b-server",
            [
                *(sys.executable, "-m", "kiln_devstack.e2b_server", "--port", str(port)),
                *("--base", str(self.data_dir / "e2b")),
            ],
            self.infra.log_dir,
            env=self.env,
        )
        wait_for(lambda: port_in_use(port), "the local E2B server")
        url = f"http://127.0.0.1:{port}"
        self.env.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY="e2b_local")

    def start_service(self, name: str) -> Process:
        """Start one process of a service: ``agent``, or a further replica ``agent-2``."""
        env = dict(self.env)
        service = name.partition("-")[0]
        if service != "gateway":  # the gateway serves /metrics on its HTTP port
            port = self.metrics_ports.get(name) or free_port()
            self.metrics_ports[name] = port
            env["KILN_HEALTH_PORT"] = str(port)
        elif name != "gateway":
            port = self.gateway_ports.get(name) or free_port()
            self.gateway_ports[name] = port
            env["KILN_GATEWAY_PORT"] = str(port)
        proc = spawn(name, [sys.executable, "-m", f"kiln_{service}"], self.infra.log_dir, env)
        self.services[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.services[name]
        os.killpg(proc.popen.pid, sig)
        proc.popen.wait(30)

    def restart(self, name: str) -> Process:
        self.services[name].stop()
        return self.start_service(name)

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            for name, proc in self.services.items():
                if not proc.alive():
                    raise InfraError(f"{name} exited at start-up:\n{proc.tail()}")
            try:
                return httpx.get(f"{self.gateway_url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, "the gateway", timeout)

    def check_alive(self) -> None:
        for name, proc in self.services.items():
            if not proc.alive():
                raise InfraError(f"{name} died:\n{proc.tail()}")

    def stop(self) -> None:
        procs = list(self.services.values())
        for proc in procs:
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in procs:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except Exception:
                proc.popen.kill()
        self.services.clear()
        if self.model_server:
            self.model_server.stop()
            self.model_server = None
        if self.e2b_server:
            self.e2b_server.stop()
            self.e2b_server = None
        self.infra.stop()
