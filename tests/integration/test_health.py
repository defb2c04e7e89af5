"""The worker services' /livez and /readyz as Kubernetes sees them: ``python -m kiln_<service>``
with ``KILN_HEALTH_PORT``, on a nats-server of the test's own that it starts late, kills and starts
again."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client

from kiln_contracts import IterationCompleted, Usage, subjects
from kiln_devstack.host import free_port, port_in_use
from kiln_devstack.infra import Infra
from kiln_devstack.model.server import ScriptedServer
from tests.infra import own_database
from tests.integration.gateway_fixtures import running_gateway

pytestmark = pytest.mark.integration


@pytest.fixture
def nats_server() -> Iterator[Infra]:
    """A nats-server of this test's own, not started yet (``start_nats``), on a fixed port so
    that the one started again after a kill is found at the same URL."""
    data_dir = Path(tempfile.mkdtemp(prefix="kh-", dir="/tmp"))
    infra = Infra(data_dir, nats_port=free_port())
    try:
        yield infra
    finally:
        infra.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


class Service:
    """One worker service as a process, and its health endpoints."""

    def __init__(self, module: str, env: dict[str, str], log_path: Path) -> None:
        self.module = module
        self.log_path = log_path
        self.env = {**os.environ, **env}
        self.proc: asyncio.subprocess.Process | None = None
        self._on_port(free_port())

    def _on_port(self, port: int) -> None:
        self.port = port
        self.env["KILN_HEALTH_PORT"] = str(port)
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=3)

    async def start(self) -> None:
        log = self.log_path.open("wb")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self.module, env=self.env, stdout=log, stderr=log
            )
        finally:
            log.close()

    async def probe(self, path: str) -> tuple[int, list[str]]:
        """(status, problems) of /livez or /readyz; (0, [why]) while nothing answers."""
        try:
            response = await self.http.get(path)
        except httpx.HTTPError as err:
            return 0, [repr(err)]
        try:
            return response.status_code, response.json()["problems"]
        except (ValueError, KeyError):
            # another process's server answers on this port: one bound it on 127.0.0.1 between
            # free_port() and this service binding 0.0.0.0, so the probes never reach the service
            return -1, [f"not this service's answer: {response.text[:200]}"]

    async def until(
        self, path: str, wanted: Callable[[int, list[str]], bool], timeout: float = 60.0
    ) -> list[str]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            status, problems = await self.probe(path)
            if status == -1:  # start again on another port
                await self.stop()
                self._on_port(free_port())
                await self.start()
                continue
            if wanted(status, problems):
                return problems
            assert self.proc is not None and self.proc.returncode is None, self.tail()
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{path}: {status} {problems}\n{self.tail()}")
            await asyncio.sleep(0.1)

    async def stop(self) -> int | None:
        await self.http.aclose()
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout=60)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def ok(status: int, problems: list[str]) -> bool:
    return status == 200


def refused_because(words: str) -> Callable[[int, list[str]], bool]:
    return lambda status, problems: status == 503 and any(words in p for p in problems)


@pytest.fixture
async def budget(
    infra: dict[str, str], nats_server: Infra, tmp_path: Path
) -> AsyncIterator[Service]:
    url = f"nats://127.0.0.1:{nats_server.nats_port}"
    service = Service(
        "kiln_budget", {"NATS_URL": url, "REDIS_URL": infra["REDIS_URL"]}, tmp_path / "log"
    )
    try:
        yield service
    finally:
        assert await service.stop() in (0, None), service.tail()


async def test_readiness_follows_nats_from_before_it_runs_to_a_kill_and_back(
    budget: Service, nats_server: Infra, infra: dict[str, str], uid: str
) -> None:
    await budget.start()  # before NATS runs: the service retries its connection meanwhile
    assert "not connected to NATS" in await budget.until("/readyz", refused_because("NATS"))
    await budget.until("/livez", ok)  # waiting for NATS is no reason to restart

    nats_url = nats_server.start_nats()
    assert await budget.until("/readyz", ok) == []
    assert await budget.probe("/livez") == (200, [])

    kill_nats(nats_server)
    await budget.until("/readyz", refused_because("not connected to NATS"), timeout=20)
    assert await budget.probe("/livez") == (200, [])  # the client reconnects by itself

    nats_server.restart("nats-server")  # the same port and JetStream store
    assert await budget.until("/readyz", ok, timeout=30) == []
    assert await budget.probe("/livez") == (200, [])
    assert port_in_use(int(nats_url.rsplit(":", 1)[1]))

    # Ready means it does its work: an iteration published now is charged.
    event = IterationCompleted(
        build_id=f"b{uid}",
        user_id=f"u{uid}",
        iteration=1,
        model="claude-haiku-4-5",
        usage=Usage(input_tokens=10, output_tokens=2),
        stop_reason="end_turn",
    )
    nc = Client()
    await nc.connect(nats_url)
    redis = aioredis.from_url(infra["REDIS_URL"], decode_responses=True)
    try:
        await nc.jetstream().publish(
            subjects.subject_of(event),
            event.model_dump_json().encode(),
            headers={"Nats-Msg-Id": str(event.event_id)},
        )
        deadline = asyncio.get_running_loop().time() + 30
        while await redis.get(f"kiln:spend:build:b{uid}") is None:
            assert asyncio.get_running_loop().time() < deadline, budget.tail()
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
        await redis.aclose()


def kill_nats(nats_server: Infra) -> None:
    (server,) = (p for p in nats_server.processes if p.name == "nats-server")
    server.popen.kill()  # SIGKILL: the server is gone at once, as a lost node is
    server.popen.wait()


async def test_the_gateways_readiness_follows_nats_too(
    infra: dict[str, str], nats_server: Infra
) -> None:
    url = nats_server.start_nats()
    async with running_gateway({**infra, "NATS_URL": url}, "gwhealth") as gateway:
        async with gateway.client() as http:

            async def until(path: str, status: int, words: str = "") -> list[str]:
                deadline = asyncio.get_running_loop().time() + 30
                while True:
                    response = await http.get(path)
                    problems: list[str] = response.json()["problems"]
                    if response.status_code == status and words in " ".join(problems):
                        return problems
                    assert asyncio.get_running_loop().time() < deadline, (path, problems)
                    await asyncio.sleep(0.1)

            assert await until("/readyz", 200) == []
            kill_nats(nats_server)
            await until("/readyz", 503, "not connected to NATS")
            assert (await http.get("/healthz")).status_code == 200
            nats_server.restart("nats-server")
            assert await until("/readyz", 200) == []


# ---------------------------------------------------------------------------- every worker


@pytest.fixture(scope="module")
def shared_nats() -> Iterator[str]:
    """A nats-server for this module's services, so they consume no other test's messages."""
    data_dir = Path(tempfile.mkdtemp(prefix="kj-", dir="/tmp"))
    infra = Infra(data_dir)
    try:
        yield infra.start_nats()
    finally:
        infra.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def own_db(infra: dict[str, str]) -> str:
    return own_database(infra["DATABASE_URL"], f"health_{uuid.uuid4().hex[:10]}")


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer()
    await server.start()
    yield server
    await server.stop()


def worker_env(
    module: str, infra: dict[str, str], db: str, scripted: ScriptedServer, tmp: Path, uid: str
) -> dict[str, Any]:
    if module == "kiln_agent":
        return {"DATABASE_URL": db, "ANTHROPIC_BASE_URL": scripted.url, "ANTHROPIC_API_KEY": "t"}
    if module == "kiln_sandbox":
        return {
            "DATABASE_URL": db,
            "KILN_SANDBOX_PROVIDER": "local",
            "KILN_SANDBOX_ROOT": str(tmp / "sandboxes"),
        }
    return {"S3_ENDPOINT_URL": infra["S3_ENDPOINT_URL"], "KILN_S3_BUCKET": f"kiln-health-{uid}"}


@pytest.mark.parametrize("module", ["kiln_agent", "kiln_sandbox", "kiln_snapshot"])
async def test_each_worker_is_live_and_then_ready_once_it_consumes(
    module: str,
    shared_nats: str,
    infra: dict[str, str],
    own_db: str,
    scripted: ScriptedServer,
    tmp_path: Path,
    uid: str,
) -> None:
    env = {"NATS_URL": shared_nats, **worker_env(module, infra, own_db, scripted, tmp_path, uid)}
    service = Service(module, env, tmp_path / "log")
    await service.start()
    try:
        assert await service.until("/readyz", ok) == []
        assert await service.probe("/livez") == (200, [])
        metrics = await service.http.get("/metrics")
        assert metrics.status_code == 200 and "kiln_messages_handled_total" in metrics.text
    finally:
        assert await service.stop() == 0, service.tail()
