"""`kiln up` and `kiln demo` with a fake stack and a fake gateway (no processes started)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from kiln_cli import local, main
from kiln_cli.builds import builds_table
from kiln_cli.client import KilnClient
from kiln_devstack.host import InfraError


class FakeStack:
    instances: list[FakeStack] = []
    fail: str | None = None

    def __init__(
        self, data_dir: Path, gateway_port: int = 8080, extra_env: dict[str, str] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.extra_env = extra_env or {}
        self.gateway_url = f"http://127.0.0.1:{gateway_port}"
        self.env = {"KILN_DEV_API_KEY": "devkey", "S3_ENDPOINT_URL": "http://s3.local"}
        self.started = self.stopped = False
        FakeStack.instances.append(self)

    def start(self) -> None:
        if FakeStack.fail:
            raise InfraError(FakeStack.fail)
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def check_alive(self) -> None:
        pass


@pytest.fixture(autouse=True)
def fake_stack(monkeypatch):
    FakeStack.instances, FakeStack.fail = [], None
    monkeypatch.setattr(local, "Stack", FakeStack)


def gateway(final_kind: str) -> Any:
    """A gateway with one build, b9: its first run ends with ``final_kind``; a message to it
    (m1) continues it, and that run completes."""
    posted: list[dict[str, Any]] = []
    messages: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer devkey"
        if request.method == "POST" and request.url.path.endswith("/messages"):
            messages.append(json.loads(request.content)["text"])
            return httpx.Response(202, json={"message_id": "m1", "seq": 1, "build_id": "b9"})
        if request.method == "POST":
            posted.append(json.loads(request.content))
            return httpx.Response(201, json={"build_id": "b9", "status": "queued"})
        if request.url.path.endswith("/events"):
            body = (
                'id: 1\nevent: build_requested\ndata: {"build_id": "b9", "tier": "pro"}\n\n'
                f'id: 2\nevent: {final_kind}\ndata: {{"summary": "done", "reason": "internal",'
                ' "iterations": 1, "cost_micro_usd": 10}\n\n'
            )
            if messages:
                body += (
                    'id: 3\nevent: send_user_message\ndata: {"message_id": "m1", "seq": 1,'
                    ' "text": "add a file"}\n\n'
                    'id: 4\nevent: build_continued\ndata: {"continuation": 1, "after":'
                    ' "completed", "message_id": "m1", "iterations": 1, "cost_micro_usd": 10}\n\n'
                    'id: 5\nevent: build_completed\ndata: {"summary": "wrote it",'
                    ' "iterations": 2, "cost_micro_usd": 20, "continuation": 1}\n\n'
                )
            return httpx.Response(200, text=body)
        status = {"build_completed": "completed", "build_failed": "failed"}[final_kind]
        return httpx.Response(
            200, json={"build_id": "b9", "status": status, "last_snapshot_id": "snap-7"}
        )

    handle.messages = messages  # type: ignore[attr-defined]
    return handle, posted


@pytest.mark.parametrize(("final", "code"), [("build_completed", 0), ("build_failed", 1)])
def test_demo_wipes_builds_follows_and_reports(monkeypatch, tmp_path: Path, final: str, code: int):
    handle, posted = gateway(final)
    monkeypatch.setattr(
        local,
        "KilnClient",
        lambda url, key: KilnClient(url, key, transport=httpx.MockTransport(handle)),
    )
    data_dir = tmp_path / "demo"
    (data_dir / "old").mkdir(parents=True)
    result = CliRunner().invoke(main.app, ["demo", "--data-dir", str(data_dir), "--port", "9999"])
    assert result.exit_code == code, result.output
    (stack,) = FakeStack.instances
    assert stack.started and stack.stopped
    assert not (data_dir / "old").exists()
    assert "textstats" in posted[0]["idea_brief"]
    assert any("unittest" in q["answer"] for q in posted[0]["understanding_qna"])
    out = "".join(result.output.split())  # rich may wrap long paths
    assert str((data_dir / "sandboxes" / "b9").resolve()) in out
    assert "snap-7ins3://kiln-snapshots/builds/b9/manifests/" in out
    # a completed build is continued once with the follow-up; a failed one is not
    assert handle.messages == ([local.DEMO_FOLLOW_UP] if final == "build_completed" else [])
    if final == "build_completed":
        assert "wroteit" in out


def test_demo_show_sleep_gives_the_budget_a_tiny_allowance(monkeypatch, tmp_path: Path):
    handle, _ = gateway("build_completed")
    monkeypatch.setattr(
        local,
        "KilnClient",
        lambda url, key: KilnClient(url, key, transport=httpx.MockTransport(handle)),
    )
    args = ["demo", "--data-dir", str(tmp_path / "d"), "--show-sleep"]
    assert CliRunner().invoke(main.app, args).exit_code == 0
    (stack,) = FakeStack.instances
    assert stack.extra_env == local.SHOW_SLEEP_ENV
    assert set(stack.extra_env) == {"KILN_BUDGET_PERIOD_S", "KILN_BUDGET_DEMO_ALLOWANCE_USD"}


def test_up_reports_infra_errors_and_exits_1(tmp_path: Path):
    FakeStack.fail = "port 8080 for the gateway is in use; pick another with --port"
    result = CliRunner().invoke(main.app, ["up", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "pick another with --port" in result.output


def test_up_prints_url_key_and_stops_on_ctrl_c(monkeypatch, tmp_path: Path):
    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(local.time, "sleep", interrupt)
    result = CliRunner().invoke(main.app, ["up", "--data-dir", str(tmp_path), "--port", "8181"])
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:8181" in result.output and "devkey" in result.output
    assert FakeStack.instances[0].stopped


@pytest.mark.parametrize("width", [60, 80])
def test_list_keeps_build_ids_whole_in_a_narrow_terminal(width: int) -> None:
    from rich.console import Console

    ids = ["3f2a9c0e8b7d4a1f9e6c5b4a3d2e1f0a", "0123456789abcdef0123456789abcdef"]
    builds = [
        {
            "build_id": i,
            "status": "sleeping_until_allowance",
            "iteration": 12,
            "cost_micro_usd": 1_234_567,
            "created_at": "2026-12-01T12:00:00.123456+00:00",
        }
        for i in ids
    ]
    console = Console(width=width, record=True)
    console.print(builds_table(builds))
    text = console.export_text()
    assert all(any(i in line for line in text.splitlines()) for i in ids)
