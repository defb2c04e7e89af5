"""`kiln webhooks ...` against a fake gateway: the requests each command sends, what it prints."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from kiln_cli import main, shared
from kiln_cli.client import KilnClient

ENDPOINT = {
    "id": "wh_" + "a" * 32,
    "url": "https://example.com/hook",
    "event_types": ["build.completed"],
    "description": "",
    "enabled": False,
    "disabled_reason": "every delivery has failed since yesterday",
    "created_at": "2026-12-01T00:00:00Z",
    "updated_at": "2026-12-01T00:00:00Z",
}


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, Any]]:
    requests: list[tuple[str, str, Any]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        requests.append((request.method, request.url.path + "?" + request.url.query.decode(), body))
        path = request.url.path
        if request.method == "POST" and path == "/v1/webhooks":
            return httpx.Response(201, json={"endpoint": ENDPOINT, "secret": "whsec_c2VjcmV0"})
        if request.method == "DELETE":
            return httpx.Response(204)
        if path.endswith("/deliveries"):
            return httpx.Response(200, json={"deliveries": []})
        if path.endswith("/wh_missing"):
            return httpx.Response(404, json={"detail": "webhook endpoint not found"})
        return httpx.Response(200, json=ENDPOINT)

    monkeypatch.setattr(
        shared,
        "KilnClient",
        lambda url, key: KilnClient(url, key, transport=httpx.MockTransport(handle)),
    )
    return requests


def run(*args: str) -> Any:
    return CliRunner().invoke(main.app, ["webhooks", *args, "--url", "http://gw", "--key", "k"])


def test_add_prints_the_secret_once_and_sends_the_types(sent: list) -> None:
    result = run("add", "https://example.com/hook", "-e", "build.completed", "-e", "build.failed")
    assert result.exit_code == 0, result.output
    assert "whsec_c2VjcmV0" in result.output
    assert sent[0][2]["event_types"] == ["build.completed", "build.failed"]


def test_update_remove_and_deliveries(sent: list) -> None:
    assert run("update", ENDPOINT["id"], "--enable").exit_code == 0
    assert sent[-1][0] == "PATCH" and sent[-1][2] == {"enabled": True}
    result = run("show", ENDPOINT["id"])
    assert "every delivery has failed" in result.output
    assert run("remove", ENDPOINT["id"]).exit_code == 0 and sent[-1][0] == "DELETE"
    assert run("deliveries", ENDPOINT["id"], "--status", "failed").exit_code == 0
    assert "status=failed" in sent[-1][1]


def test_an_unknown_endpoint_fails_with_the_gateway_s_reason(sent: list) -> None:
    result = run("show", "wh_missing")
    assert result.exit_code == 1 and "not found" in result.output
