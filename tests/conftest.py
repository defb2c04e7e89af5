from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.infra import infrastructure

if TYPE_CHECKING:
    from kiln_devstack.e2b_server import E2BServer

os.environ.setdefault("AWS_ACCESS_KEY_ID", "kiln-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "kiln-test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def infra() -> Iterator[dict[str, str]]:
    """URLs of a real NATS (JetStream, >= 2.12), Postgres, Redis and S3 API for the session."""
    # A short path: Postgres puts its Unix socket in the data directory.
    data_dir = Path(tempfile.mkdtemp(prefix="kt-", dir="/tmp"))
    try:
        with infrastructure(data_dir) as urls:
            yield urls
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def uid() -> str:
    """A unique id for this test (build ids, user ids, buckets ...)."""
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
async def e2b_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[E2BServer]:
    """The local E2B-compatible server the real ``e2b`` SDK talks to (kiln_devstack)."""
    from kiln_devstack.e2b_server import E2BServer  # the SDK is large: only where used

    server = E2BServer(tmp_path_factory.mktemp("e2b"))
    await server.start()
    yield server
    await server.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """How ``make test`` shares the tests between its processes (``--dist loadgroup``): the
    integration tests in one of them, in the order of a run in one process (they share that
    process's servers), the unit tests together, and each end-to-end file on its own (its stack
    is the module's)."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(Path(__file__).parent).parts
        group = f"e2e-{parts[-1]}" if parts[0] == "e2e" else parts[0]
        item.add_marker(pytest.mark.xdist_group(group))
