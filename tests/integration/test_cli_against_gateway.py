"""The kiln CLI against a real gateway: keys, list, logs, wake, say, cancel, download, budget, fork,
rollback, with the gateway's URL and keys from a config file."""

from __future__ import annotations

import asyncio
import io
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from kiln_cli import following, main
from kiln_cli.render import Renderer
from kiln_contracts import AgentNarrated, BuildRequested, IterationCompleted, ToolCall, Usage
from tests.integration.test_gateway_api import Gateway, until
from tests.integration.test_gateway_surface import ADMIN, _put_snapshot, gw  # noqa: F401

pytestmark = pytest.mark.integration


async def kiln(config: Path, *args: str) -> Result:
    """Run a `kiln` command in a thread (the gateway serves on this event loop)."""
    env = {"KILN_CONFIG_FILE": str(config), "KILN_URL": "", "KILN_API_KEY": ""}
    return await asyncio.to_thread(
        CliRunner().invoke, main.app, list(args), env=env, catch_exceptions=False
    )


async def test_cli_commands_against_a_gateway(gw: Gateway, infra, tmp_path: Path, uid: str):  # noqa: F811
    user = f"cli{uid}"
    config = tmp_path / "config.toml"
    config.write_text(f'url = "{gw.url}"\nadmin_key = "{ADMIN}"\n')

    created = await kiln(config, "keys", "create", "--user", user, "--tier", "pro")
    assert created.exit_code == 0, created.output
    api_key = created.stdout.strip().splitlines()[-1]
    assert api_key.startswith("kiln_")
    config.write_text(f'url = "{gw.url}"\napi_key = "{api_key}"\nadmin_key = "{ADMIN}"\n')

    listed = await kiln(config, "keys", "list", "--user", user)
    assert api_key[:12] in listed.stdout and api_key not in listed.stdout

    # A build from another producer, with a narration and a tool call so far.
    build_id = f"b{uid}"
    await gw.bus.publish(
        BuildRequested(build_id=build_id, user_id=user, tier="pro", idea_brief="x")
    )
    await gw.bus.publish(
        AgentNarrated(build_id=build_id, user_id=user, iteration=1, text="Planning")
    )
    await gw.bus.publish(
        ToolCall(
            build_id=build_id,
            user_id=user,
            call_id="c1",
            iteration=1,
            tool="bash",
            input={"command": "ls -la"},
        )
    )

    async def projected() -> bool:
        b = await gw.rt.store.get(build_id)
        return b is not None and b.state.last_seq > 0

    await until(projected)
    out = await kiln(config, "list")
    assert out.exit_code == 0 and build_id in out.stdout and "running" in out.stdout
    assert build_id not in (await kiln(config, "list", "--status", "completed")).stdout

    logs = await kiln(config, "logs", build_id)
    assert logs.exit_code == 0, logs.output
    assert "Planning" in logs.stdout and "ls -la" in logs.stdout

    assert "wake requested" in (await kiln(config, "wake", build_id)).stdout
    kinds = [k for _, k in await gw.history(build_id)]
    assert kinds[-1] == "wake_requested"

    said = await kiln(config, "say", build_id, "please write NOTES.md")
    assert said.exit_code == 0 and f"(#1) sent to build {build_id}" in said.stdout
    assert [k for _, k in await gw.history(build_id)][-1] == "send_user_message"
    logs = await kiln(config, "logs", build_id)
    assert "you: please write NOTES.md" in logs.stdout

    budget = await kiln(config, "budget")
    assert budget.exit_code == 0 and user in budget.stdout and "tier pro" in budget.stdout

    missing = await kiln(config, "download", build_id, "-o", str(tmp_path / "none.tgz"))
    assert missing.exit_code == 1 and "no snapshot" in missing.output
    assert not (tmp_path / "none.tgz").exists() and not (tmp_path / "none.tgz.part").exists()
    _put_snapshot(infra, "kiln-gw-surface", build_id, {"app.py": (b"print(1)\n", 0o644)})
    target = tmp_path / "files.tgz"
    got = await kiln(config, "download", build_id, "-o", str(target))
    assert got.exit_code == 0, got.output
    with tarfile.open(target) as tar:
        assert tar.getnames() == [f"kiln-{build_id}/app.py"]

    assert "cancel requested" in (await kiln(config, "cancel", build_id)).stdout
    other = await gw.key(f"o{uid}")
    stranger = await asyncio.to_thread(
        CliRunner().invoke,
        main.app,
        ["status", build_id],
        env={"KILN_CONFIG_FILE": str(config), "KILN_API_KEY": other, "KILN_URL": ""},
    )
    assert stranger.exit_code == 1 and "build not found" in stranger.output

    revoked = await kiln(config, "keys", "revoke", api_key[:12])
    assert revoked.exit_code == 0, revoked.output
    refused = await kiln(config, "list")
    assert refused.exit_code == 1 and "refused" in refused.output


def test_progress_line_shows_iteration_tool_cost_and_sleep():
    from rich.console import Console

    from kiln_cli.client import SseEvent

    r = Renderer(Console(file=io.StringIO()))
    r(SseEvent("build_requested", {"build_id": "b", "tier": "pro"}))
    r(SseEvent("tool_call", {"iteration": 3, "tool": "bash", "input": {"command": "ls"}}))
    r(SseEvent("iteration_completed", {"iteration": 3, "cost_micro_usd": 12_345}))
    budget = {"spent_today_micro_usd": 500_000, "daily_allowance_micro_usd": 2_000_000}
    line = following.progress_line(r, budget)
    assert "iteration 3" in line and "bash" in line
    assert "$0.0123" in line and "$0.5000 of $2.0000" in line
    r(SseEvent("build_sleeping", {"reason": "budget"}))
    assert "sleeping" in following.progress_line(r, None)
    r(SseEvent("build_resumed", {"reason": "wake"}))
    assert "woken" in following.progress_line(r, None)


async def test_fork_and_rollback_against_a_gateway(gw: Gateway, infra, tmp_path: Path, uid: str):  # noqa: F811
    user = f"fk{uid}"
    api_key = await gw.key(user)
    config = tmp_path / "config.toml"
    config.write_text(f'url = "{gw.url}"\napi_key = "{api_key}"\n')
    build_id = f"b{uid}"
    await gw.bus.publish(
        BuildRequested(build_id=build_id, user_id=user, tier="pro", idea_brief="x")
    )
    for i in (1, 2):
        await gw.bus.publish(
            IterationCompleted(
                build_id=build_id, user_id=user, iteration=i, model="claude-haiku-4-5", usage=Usage(),
                stop_reason="tool_use",
            )
        )  # fmt: skip

    async def at_two() -> bool:
        b = await gw.rt.store.get(build_id)
        return b is not None and b.state.iteration == 2

    await until(at_two)
    snapshot = _put_snapshot(infra, "kiln-gw-surface", build_id, {"app.py": (b"print(1)\n", 0o644)})

    forked = await kiln(config, "fork", build_id, "--at", "1")
    assert forked.exit_code == 0, forked.output
    assert f"build {build_id} at iteration 1, files of snapshot {snapshot}" in forked.stdout
    fork_id = forked.stdout.split()[1]
    assert (await gw.rt.store.get(fork_id)).fork_of == build_id  # type: ignore[union-attr]
    by_id = await kiln(config, "fork", build_id, "--snapshot", snapshot)
    assert by_id.exit_code == 0 and f"files of snapshot {snapshot}" in by_id.stdout
    both = await kiln(config, "fork", build_id, "--at", "1", "--snapshot", snapshot)
    assert both.exit_code == 1 and "exactly one" in both.output
    beyond = await kiln(config, "fork", build_id, "--at", "9")
    assert beyond.exit_code == 1 and "reached iteration 2" in beyond.output

    rolled = await kiln(config, "rollback", build_id, "--to", "1")
    assert rolled.exit_code == 0, rolled.output
    new_id = rolled.stdout.split()[1]
    assert new_id not in (build_id, fork_id)
    assert f"build {build_id} cancelled" in rolled.stdout
    assert f"continue in build {new_id} (was {build_id}, now at iteration 1)" in rolled.stdout
    assert [k for _, k in await gw.history(build_id)][-1] == "cancel_requested"
    assert [k for _, k in await gw.history(new_id)] == ["build_requested"]
