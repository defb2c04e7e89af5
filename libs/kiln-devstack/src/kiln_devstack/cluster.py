"""A JetStream cluster on loopback: three (or more) ``nats-server`` processes from the wheel, each
with its own store, routed to one another.

Ports: each node is started on ports chosen beforehand (``free_port``: each handed out once) and
the node itself reports what it bound (``--ports_file_dir``): a node that could not bind its port
(another process took it between the choice and the start) exits, and the whole cluster is started
again on new ports. A restarted node comes back on the ports it had.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from .host import InfraError, Process, binary, free_port, spawn

CLUSTER_NAME = "kiln"
START_ATTEMPTS = 5


def distinct_ports(count: int) -> list[int]:
    """``count`` ports free just now, none handed out before in this process (``free_port``)."""
    return [free_port() for _ in range(count)]


@dataclass
class Node:
    name: str
    client_port: int
    cluster_port: int
    store: Path
    process: Process | None = None
    stopped: bool = False  # SIGSTOPped now

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"


@dataclass
class NatsCluster:
    data_dir: Path
    log_dir: Path
    size: int = 3
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (kiln_runtime's NATS_URL takes that form)."""
        return ",".join(n.url for n in self.nodes)

    def start(self, timeout: float = 30.0) -> str:
        last = ""
        for _ in range(START_ATTEMPTS):
            ports = distinct_ports(2 * self.size)
            self.nodes = [
                Node(
                    f"nats-{i + 1}",
                    ports[2 * i],
                    ports[2 * i + 1],
                    self.data_dir / "nats-cluster" / f"n{i + 1}",
                )
                for i in range(self.size)
            ]
            for node in self.nodes:
                self._spawn(node)
            try:
                for node in self.nodes:
                    self._wait_bound(node, timeout)
                return self.url
            except InfraError as err:
                last = str(err)
                self.stop()
        raise InfraError(f"the NATS cluster did not start after {START_ATTEMPTS} tries: {last}")

    def _args(self, node: Node) -> list[str]:
        routes = ",".join(f"nats://127.0.0.1:{n.cluster_port}" for n in self.nodes)
        return [
            binary("nats-server"),
            *("-a", "127.0.0.1", "-p", str(node.client_port), "-n", node.name),
            *("-js", "-sd", str(node.store)),
            *("--cluster_name", CLUSTER_NAME),
            *("--cluster", f"nats://127.0.0.1:{node.cluster_port}", "--routes", routes),
            *("--ports_file_dir", str(node.store)),
        ]

    def _spawn(self, node: Node) -> None:
        node.store.mkdir(parents=True, exist_ok=True)
        for old in node.store.glob("*.ports"):
            old.unlink(missing_ok=True)
        node.process = spawn(node.name, self._args(node), self.log_dir)
        node.stopped = False

    def _wait_bound(self, node: Node, timeout: float) -> None:
        """Until the node itself reports listening on its client and cluster ports."""
        assert node.process is not None
        proc = node.process
        ports_file = node.store / f"nats-server_{proc.popen.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise InfraError(f"{node.name} exited:\n{proc.tail(5)}")
            with contextlib.suppress(OSError, ValueError):
                bound = json.loads(ports_file.read_text())
                want_client = f"nats://127.0.0.1:{node.client_port}"
                want_cluster = f"nats://127.0.0.1:{node.cluster_port}"
                if want_client in bound.get("nats", []) and want_cluster in bound.get(
                    "cluster", []
                ):
                    return
            time.sleep(0.05)
        raise InfraError(f"{node.name} did not report its ports within {timeout:.0f}s")

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def kill(self, name: str) -> None:
        """SIGKILL one node (its store stays)."""
        node = self.node(name)
        if node.process and node.process.alive():
            os.killpg(node.process.popen.pid, signal.SIGKILL)
            node.process.popen.wait(10)

    def start_node(self, name: str, timeout: float = 30.0) -> None:
        """Start a node that is down again, on the ports it had."""
        node = self.node(name)
        self._spawn(node)
        self._wait_bound(node, timeout)

    def pause(self, name: str) -> None:
        """SIGSTOP a node: its sockets stay open but it answers nothing (a hung machine)."""
        node = self.node(name)
        assert node.process is not None
        os.killpg(node.process.popen.pid, signal.SIGSTOP)
        node.stopped = True

    def resume(self, name: str) -> None:
        node = self.node(name)
        assert node.process is not None
        os.killpg(node.process.popen.pid, signal.SIGCONT)
        node.stopped = False

    def processes(self) -> list[Process]:
        return [n.process for n in self.nodes if n.process is not None]

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is None:
                continue
            if node.stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.process.popen.pid, signal.SIGCONT)
            node.process.stop()
