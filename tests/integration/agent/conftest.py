"""Fixtures of the agent's integration tests: the scripted Anthropic-compatible server, and a NATS
server and database of the module's own (so agent processes see only this module's builds)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from kiln_devstack.infra import Infra
from kiln_devstack.model.server import ScriptedServer
from tests.infra import own_database


async def until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not met before the deadline: {what or predicate}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer()
    server.record = True
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
def own_nats() -> Iterator[str]:
    """A nats-server of this module's own (JetStream, in a temporary directory)."""
    data_dir = Path(tempfile.mkdtemp(prefix="kn-", dir="/tmp"))
    infra = Infra(data_dir)
    try:
        yield infra.start_nats()
    finally:
        infra.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def own_db(infra: dict[str, str]) -> str:
    """A fresh database on the session's Postgres."""
    return own_database(infra["DATABASE_URL"], f"agent_{uuid.uuid4().hex[:10]}")
