"""The gateway's /v1/webhooks with no webhooks service answering: a clear 503, never a hang or
a 500; input is still validated first (the service's own behaviour is tests/e2e/test_webhooks.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.integration.gateway_fixtures import Gateway, running_gateway

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gw(infra) -> AsyncIterator[Gateway]:
    async with running_gateway(infra, "gwhooks", gateway_webhooks_timeout_s=1.0) as gateway:
        yield gateway


async def test_without_the_webhooks_service_the_gateway_answers_503(gw: Gateway, uid: str):
    key = await gw.key(f"u{uid}")
    async with gw.client(key) as c:
        listed = await c.get("/v1/webhooks")
        assert listed.status_code == 503, listed.text
        assert listed.headers["content-type"].startswith("application/problem+json")
        assert "webhooks service" in listed.json()["detail"]
        created = await c.post("/v1/webhooks", json={"url": "https://example.com/hook"})
        assert created.status_code == 503
        # FastAPI validates before anything is asked
        bad = await c.post("/v1/webhooks", json={"url": "https://example.com/x", "extra": 1})
        assert bad.status_code == 422
    async with gw.client() as c:
        assert (await c.get("/v1/webhooks")).status_code == 401
