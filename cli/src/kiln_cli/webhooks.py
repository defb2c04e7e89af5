"""``kiln webhooks ...``: the caller's webhook endpoints and their delivery logs."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from kiln_contracts.webhooks import EVENT_TYPES

from .shared import KeyOpt, UrlOpt, console, err, open_client

webhooks_app = typer.Typer(
    help="Webhooks: endpoints that get your builds' events, signed (Standard Webhooks)."
)

EndpointArg = Annotated[str, typer.Argument(help="The endpoint's id (wh_...).")]

EventOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--event",
        "-e",
        help=f"An event type (repeat it): {', '.join(EVENT_TYPES)}. Default: all but "
        "build.iteration.",
    ),
]


def _show(endpoint: dict[str, Any]) -> None:
    state = "enabled" if endpoint["enabled"] else "disabled"
    console.print(f"{endpoint['id']}  {endpoint['url']}  ({state})", highlight=False)
    console.print(f"  events: {', '.join(endpoint['event_types'])}", highlight=False)
    if endpoint.get("description"):
        console.print(f"  {endpoint['description']}", highlight=False)
    if endpoint.get("disabled_reason"):
        console.print(f"  disabled: {endpoint['disabled_reason']}", highlight=False)
    if endpoint.get("failing_since"):
        console.print(f"  failing since {endpoint['failing_since']}", highlight=False)


@webhooks_app.command("add")
def add(
    target: Annotated[str, typer.Argument(help="The https URL to POST the events to.")],
    event: EventOpt = None,
    description: Annotated[str, typer.Option(help="What it is for.")] = "",
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Register an endpoint; its signing secret is printed once."""
    body: dict[str, Any] = {"url": target, "description": description}
    if event:
        body["event_types"] = event
    with open_client(url, key) as client:
        created = client.call("POST", "/v1/webhooks", json=body)
    _show(created["endpoint"])
    err.print("signing secret (not shown again):")
    console.print(created["secret"], highlight=False)


@webhooks_app.command("list")
def list_(url: UrlOpt = None, key: KeyOpt = None) -> None:
    """Your endpoints."""
    with open_client(url, key) as client:
        found = client.call("GET", "/v1/webhooks")["webhooks"]
    table = Table("id", "url", "events", "state")
    for w in found:
        state = "enabled" if w["enabled"] else f"disabled: {w.get('disabled_reason') or 'by you'}"
        table.add_row(w["id"], w["url"], ", ".join(w["event_types"]), state)
    console.print(table)


@webhooks_app.command("show")
def show(endpoint_id: EndpointArg, url: UrlOpt = None, key: KeyOpt = None) -> None:
    """One endpoint."""
    with open_client(url, key) as client:
        _show(client.call("GET", f"/v1/webhooks/{endpoint_id}"))


@webhooks_app.command("update")
def update(
    endpoint_id: EndpointArg,
    target: Annotated[str | None, typer.Option("--target", help="A new URL.")] = None,
    event: EventOpt = None,
    description: Annotated[str | None, typer.Option(help="A new description.")] = None,
    enable: Annotated[
        bool | None, typer.Option("--enable/--disable", help="Turn deliveries on or off.")
    ] = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Change an endpoint (enabling one Kiln disabled clears the reason)."""
    body: dict[str, Any] = {}
    if target is not None:
        body["url"] = target
    if event:
        body["event_types"] = event
    if description is not None:
        body["description"] = description
    if enable is not None:
        body["enabled"] = enable
    with open_client(url, key) as client:
        _show(client.call("PATCH", f"/v1/webhooks/{endpoint_id}", json=body))


@webhooks_app.command("remove")
def remove(endpoint_id: EndpointArg, url: UrlOpt = None, key: KeyOpt = None) -> None:
    """Remove an endpoint and its delivery log."""
    with open_client(url, key) as client:
        client.call("DELETE", f"/v1/webhooks/{endpoint_id}")
    console.print(f"removed {endpoint_id}", highlight=False)


@webhooks_app.command("rotate")
def rotate(
    endpoint_id: EndpointArg,
    overlap_s: Annotated[
        int, typer.Option(help="Seconds the old secret still signs too.")
    ] = 86_400,
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """A new signing secret, printed once; the old one signs too for the overlap."""
    with open_client(url, key) as client:
        rotated = client.call(
            "POST", f"/v1/webhooks/{endpoint_id}/rotate-secret", json={"overlap_s": overlap_s}
        )
    err.print("new signing secret (not shown again):")
    console.print(rotated["secret"], highlight=False)


@webhooks_app.command("deliveries")
def deliveries(
    endpoint_id: EndpointArg,
    status: Annotated[str | None, typer.Option(help="pending, delivered or failed.")] = None,
    limit: Annotated[int, typer.Option(help="How many (newest first).")] = 20,
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """The endpoint's delivery log: status, attempts, the last response."""
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    with open_client(url, key) as client:
        found = client.call("GET", f"/v1/webhooks/{endpoint_id}/deliveries", params=params)
    table = Table("id", "type", "build", "status", "attempts", "last", "when")
    for d in found["deliveries"]:
        last = str(d.get("last_status_code") or d.get("last_error") or "")
        table.add_row(
            d["id"],
            d["event_type"],
            d["build_id"],
            d["status"],
            str(d["attempts"]),
            last[:40],
            str(d.get("last_attempt_at") or "")[:19],
        )
    console.print(table)


@webhooks_app.command("redeliver")
def redeliver(
    endpoint_id: EndpointArg,
    delivery_id: Annotated[str, typer.Argument(help="The delivery's id (msg_...).")],
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Send a delivery again now, with its webhook-id."""
    with open_client(url, key) as client:
        d = client.call("POST", f"/v1/webhooks/{endpoint_id}/deliveries/{delivery_id}/redeliver")
    console.print(f"{d['id']} queued again (attempts so far: {d['attempts']})", highlight=False)
