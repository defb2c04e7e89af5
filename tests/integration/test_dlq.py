"""Dead letters on a real nats-server: a consumer gives up on a message, `kiln dlq list` and
`show` say what failed, where, why and how often, and `replay` (once the cause is fixed)
delivers it again to the same consumer under a new message id."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from typer.testing import CliRunner, Result

from kiln_cli import main, shared
from kiln_contracts import ToolCall
from kiln_runtime.bus import Bus, Delivery
from kiln_runtime.dead_letters import cause_of
from kiln_runtime.errors import PermanentError
from kiln_runtime.settings import CommonSettings
from tests.integration.gateway_fixtures import running_gateway, until

pytestmark = pytest.mark.integration

ADMIN = "adm-dlq-test"


async def kiln(config: Path, *args: str) -> Result:
    env = {"KILN_CONFIG_FILE": str(config), "KILN_URL": "", "KILN_API_KEY": "", "COLUMNS": "250"}
    shared.console.width = 250  # made at import, before COLUMNS: wide enough not to wrap
    return await asyncio.to_thread(
        CliRunner().invoke, main.app, list(args), env=env, catch_exceptions=False
    )


def test_causes() -> None:
    assert cause_of("gave up after 20 deliveries") == "max_deliver"
    assert cause_of("SandboxUnavailable: quota") == "SandboxUnavailable"
    assert cause_of("ValueError: bad") == "ValueError"
    assert cause_of("invalid ToolCall: field required") == "rejected"


async def test_list_show_and_replay_a_dead_letter(infra, tmp_path: Path, uid: str) -> None:
    service = f"dlqsvc{uid}"
    build_id = f"b{uid}"
    fixed = False
    handled: list[Delivery] = []

    async def handle(call: ToolCall, delivery: Delivery) -> None:
        if call.build_id != build_id:
            return
        if not fixed:
            raise PermanentError("the sandbox provider refused the key")
        handled.append(delivery)

    worker = Bus(CommonSettings(nats_url=infra["NATS_URL"]), service)
    await worker.connect()
    worker.consume(ToolCall, handle, durable=f"{service}-toolcall")
    await worker.start()
    async with running_gateway(
        infra, f"gwdlq{uid}", admin_api_key=ADMIN, gateway_projection_durable=f"gw-dlq-{uid}"
    ) as gw:
        try:
            config = tmp_path / "config.toml"
            config.write_text(f'url = "{gw.url}"\nadmin_key = "{ADMIN}"\n')
            call = ToolCall(
                build_id=build_id,
                user_id="u",
                call_id="c1",
                iteration=1,
                tool="bash",
                input={"command": "true"},
            )
            await gw.bus.publish(call)

            async with gw.client(ADMIN) as http:

                async def dead_lettered() -> bool:
                    r = await http.get("/v1/admin/dlq", params={"service": service})
                    return bool(r.json()["dead_letters"])

                await until(dead_lettered, timeout=30)
                assert (await http.get("/v1/admin/dlq")).status_code == 200
            async with gw.client() as anonymous:
                assert (await anonymous.get("/v1/admin/dlq")).status_code == 401
            async with gw.client("not-the-admin-key") as wrong:
                assert (await wrong.post("/v1/admin/dlq/1/replay")).status_code == 401

            listed = await kiln(config, "dlq", "list", "--service", service)
            assert listed.exit_code == 0, listed.output
            out = " ".join(listed.stdout.split())
            assert "the sandbox provider refused the key" in out
            assert "tool_call" in out and "rejected" in out
            async with gw.client(ADMIN) as http:
                page = (await http.get("/v1/admin/dlq", params={"service": service})).json()
            [letter] = page["dead_letters"]
            assert letter["original_subject"] == f"kiln.build.{build_id}.tool_call"
            assert page["groups"][0]["count"] == 1
            labels = {"service": service, "kind": "tool_call", "cause": "rejected"}
            assert REGISTRY.get_sample_value("kiln_dead_letter_causes_total", labels) == 1

            shown = await kiln(config, "dlq", "show", str(letter["seq"]))
            assert shown.exit_code == 0, shown.output
            assert '"call_id": "c1"' in shown.stdout
            assert f"original_subject: kiln.build.{build_id}.tool_call" in shown.stdout

            fixed = True  # the cause is fixed: replay it
            replayed = await kiln(config, "dlq", "replay", str(letter["seq"]))
            assert replayed.exit_code == 0, replayed.output
            assert f"replayed {letter['seq']} to kiln.build.{build_id}.tool_call" in replayed.stdout

            async def redelivered() -> bool:
                return bool(handled)

            await until(redelivered, timeout=30)
            assert handled[0].stream_seq != letter["original_seq"]  # a new message
            async with gw.client(ADMIN) as http:
                page = (await http.get("/v1/admin/dlq", params={"service": service})).json()
                assert page["dead_letters"] == []
                gone = await http.get(f"/v1/admin/dlq/{letter['seq']}")
                assert gone.status_code == 404, gone.text
                again = await http.post(f"/v1/admin/dlq/{letter['seq']}/replay")
                assert again.status_code == 404
            listed = await kiln(config, "dlq", "list", "--service", service)
            assert "no dead letters" in listed.stdout
        finally:
            await worker.stop()
