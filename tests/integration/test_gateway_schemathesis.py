"""schemathesis against the gateway's own OpenAPI document: generated requests (valid and not)
to every operation, and no server error. The gateway runs as a process on its own NATS server
and database, so the builds it creates reach no other test's consumers; a budget service runs
beside it (it answers GET /v1/budget and applies the top-ups), and a webhooks service (it answers
/v1/webhooks...)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kiln_devstack.host import free_port
from kiln_devstack.infra import Infra
from tests.infra import own_database

pytestmark = pytest.mark.integration

KEY = "kiln-schemathesis-key"
ADMIN = "kiln-schemathesis-admin"


@pytest.fixture(scope="module")
def gateway_url(infra: dict[str, str]) -> Iterator[str]:
    data_dir = Path(tempfile.mkdtemp(prefix="ks-", dir="/tmp"))
    nats = Infra(data_dir)
    port = free_port()
    log = (data_dir / "gateway.log").open("wb")
    proc: subprocess.Popen[bytes] | None = None
    budget: subprocess.Popen[bytes] | None = None
    webhooks: subprocess.Popen[bytes] | None = None
    try:
        nats_url = nats.start_nats()
        database_url = own_database(infra["DATABASE_URL"], f"st_{uuid.uuid4().hex[:8]}")
        budget = subprocess.Popen(
            [sys.executable, "-m", "kiln_budget"],
            env={**os.environ, "NATS_URL": nats_url, "REDIS_URL": infra["REDIS_URL"]},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        env = {
            **os.environ,
            "NATS_URL": nats_url,
            "DATABASE_URL": database_url,
            "S3_ENDPOINT_URL": infra["S3_ENDPOINT_URL"],
            "KILN_GATEWAY_PORT": str(port),
            "KILN_GATEWAY_HOST": "127.0.0.1",
            "KILN_DEV_API_KEY": KEY,
            "KILN_DEV_USER": "schemathesis",
            "KILN_DEV_TIER": "team",
            "KILN_ADMIN_API_KEY": ADMIN,
            "KILN_SSE_HEARTBEAT_S": "0.2",
            "KILN_MAX_BODY_BYTES": str(256 * 1024),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "kiln_gateway"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        webhooks = subprocess.Popen(
            [sys.executable, "-m", "kiln_webhooks"],
            env={
                **os.environ,
                "NATS_URL": nats_url,
                "DATABASE_URL": database_url,
                "KILN_WEBHOOKS_RESOLVE_TIMEOUT_S": "1",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (data_dir / "gateway.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the gateway did not become ready"
            time.sleep(0.1)
        auth = {"Authorization": f"Bearer {KEY}"}
        while httpx.get(f"{url}/v1/budget", headers=auth, timeout=10).status_code != 200:
            assert budget.poll() is None, (data_dir / "gateway.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the budget service did not answer"
            time.sleep(0.1)
        while httpx.get(f"{url}/v1/webhooks", headers=auth, timeout=10).status_code != 200:
            assert webhooks.poll() is None, (data_dir / "gateway.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the webhooks service did not answer"
            time.sleep(0.1)
        yield url
    finally:
        for p in (proc, budget, webhooks):
            if p is not None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
        log.close()
        if proc is not None and proc.returncode not in (0, -15, None):
            print((data_dir / "gateway.log").read_text()[-3000:])
        nats.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _exercise(operation: Any, base_url: str, headers: dict[str, str]) -> Callable[[], None]:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=8,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def exercise(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=base_url, headers=headers, timeout=10, checks=CHECKS)

    return exercise  # type: ignore[no-any-return]


def test_generated_requests_get_no_server_errors(gateway_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")
    failures: dict[str, str] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        # An admin operation with the admin key, the rest with a user's key. The events
        # endpoint streams until its build ends; under a generated path no build exists, so
        # its requests fail fast.
        key = ADMIN if operation.path.startswith("/v1/admin") else KEY
        headers = {"Authorization": f"Bearer {key}"}

        exercise = _exercise(operation, gateway_url, headers)
        try:
            exercise()
        except Exception as err:  # collect every operation's failure, then report them all
            failures[operation.label] = str(err)[:2000]
    assert operations >= 15
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
