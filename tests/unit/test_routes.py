"""The bus topology in kiln_contracts.routes is what the services really subscribe to."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from kiln_contracts import subjects
from kiln_contracts.routes import CONSUMES
from kiln_runtime.bus import Bus
from kiln_runtime.settings import CommonSettings


def subscribed(bus: Bus) -> set[str]:
    return {f for puller in bus.pullers.values() for f in puller.filters}


def registered(service: str) -> set[str]:
    bus = Bus(CommonSettings(), service)
    none: Any = None
    if service == "agent":
        from kiln_agent.app import register as register_agent

        register_agent(bus, none)
    elif service == "sandbox":
        from kiln_sandbox.app import SandboxApp

        SandboxApp(bus)
    elif service == "budget":
        from kiln_budget.app import register as register_budget

        register_budget(bus, none)
    elif service == "snapshot":
        from kiln_snapshot.app import register as register_snapshot

        register_snapshot(bus, none)
    elif service == "webhooks":
        from kiln_webhooks.app import register as register_webhooks

        register_webhooks(bus, none, durable="webhooks-events")
    elif service == "gateway":
        from kiln_gateway.app import register_consumers

        register_consumers(
            SimpleNamespace(bus=bus, settings=SimpleNamespace(gateway_projection_durable="p"))  # type: ignore[arg-type]
        )
    return subscribed(bus)


@pytest.mark.parametrize("service", sorted(CONSUMES))
def test_each_service_consumes_what_the_routes_say(service: str) -> None:
    expected = {subjects.kind_filter(m.kind) for m in CONSUMES[service]}
    if service == "gateway":
        expected = {"kiln.build.>"}  # one consumer for every kind
    assert registered(service) == expected
