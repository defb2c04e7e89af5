"""``kiln keys ...`` and ``kiln dlq ...``: API keys and dead letters, with the admin key."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from .shared import AdminOpt, UrlOpt, console, err, open_client, resolve_admin_key

keys_app = typer.Typer(help="API keys (admin): create, revoke, list.")


dlq_app = typer.Typer(help="Dead letters (admin): list, show, replay.")


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Option("--user", help="The user the key belongs to.")],
    tier: Annotated[str, typer.Option("--tier", help="free, pro, team ... (kiln.yaml)")] = "free",
    url: UrlOpt = None,
    admin_key: AdminOpt = None,
) -> None:
    """Create an API key; it is printed once and only its hash is stored."""
    with open_client(url, resolve_admin_key(admin_key)) as client:
        k = client.create_key(user, tier)
    err.print(f"key {k['key_id']} for {k['user_id']} (tier {k['tier']}); it is not shown again:")
    console.print(k["api_key"], highlight=False)


@keys_app.command("revoke")
def keys_revoke(
    ident: Annotated[str, typer.Argument(help="The key's id, or the start of the key.")],
    url: UrlOpt = None,
    admin_key: AdminOpt = None,
) -> None:
    """Revoke an API key (by its id or its prefix, at least 6 characters)."""
    with open_client(url, resolve_admin_key(admin_key)) as client:
        k = client.revoke_key(ident)
    console.print(f"revoked {k['key_id']} ({k['user_id']})", highlight=False)


@keys_app.command("list")
def keys_list(
    user: Annotated[str | None, typer.Option("--user")] = None,
    url: UrlOpt = None,
    admin_key: AdminOpt = None,
) -> None:
    """List API keys (never the keys themselves)."""
    with open_client(url, resolve_admin_key(admin_key)) as client:
        keys = client.list_keys(user)["keys"]
    table = Table("id", "prefix", "user", "tier", "created", "revoked")
    for k in keys:
        table.add_row(
            k["key_id"],
            k["key_prefix"],
            k["user_id"],
            k["tier"],
            str(k["created_at"])[:19],
            str(k.get("revoked_at") or "")[:19],
        )
    console.print(table)


@dlq_app.command("list")
def dlq_list(
    service: Annotated[str | None, typer.Option(help="Only this service's dead letters.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only this kind (ToolCall, ...).")] = None,
    limit: Annotated[int, typer.Option(help="How many (oldest first).")] = 100,
    url: UrlOpt = None,
    admin_key: AdminOpt = None,
) -> None:
    """What failed, in which service, why, and how often."""
    with open_client(url, resolve_admin_key(admin_key)) as client:
        page = client.list_dead_letters(service, kind, limit=limit)
    letters = page["dead_letters"]
    if not letters:
        console.print("no dead letters")
        return
    groups = Table("count", "service", "kind", "cause", "example reason", title="how often")
    for g in page["groups"]:
        groups.add_row(str(g["count"]), g["service"], g["kind"], g["cause"], g["example_reason"])
    console.print(groups)
    table = Table("seq", "service", "kind", "original subject", "at", "reason")
    table.columns[0].no_wrap = table.columns[3].no_wrap = True
    table.columns[3].overflow = "fold"
    for d in letters:
        table.add_row(
            str(d["seq"]),
            d["service"],
            d["kind"],
            d["original_subject"],
            str(d.get("at") or "")[:19],
            d["reason"],
        )
    console.print(table)
    if page.get("next_after"):
        err.print(f"more after seq {page['next_after']}: raise --limit")


@dlq_app.command("show")
def dlq_show(
    seq: Annotated[int, typer.Argument(help="The dead letter's seq (from kiln dlq list).")],
    url: UrlOpt = None,
    admin_key: AdminOpt = None,
) -> None:
    """One dead letter: its headers and its payload."""
    with open_client(url, resolve_admin_key(admin_key)) as client:
        d = client.get_dead_letter(seq)
    payload = d.pop("payload")
    for key in ("seq", "service", "kind", "cause", "reason", "original_subject", "original_seq"):
        console.print(f"{key}: {d.get(key)}", highlight=False)
    console.print(f"at: {d.get('at')}", highlight=False)
    console.print_json(data=payload) if not isinstance(payload, str) else console.print(payload)


@dlq_app.command("replay")
def dlq_replay(
    seqs: Annotated[list[int], typer.Argument(help="The dead letters' seqs.")],
    keep: Annotated[bool, typer.Option(help="Keep them in the DLQ after replaying.")] = False,
    url: UrlOpt = None,
    admin_key: AdminOpt = None,
) -> None:
    """Publish dead letters again to their original subjects (fix their cause first)."""
    with open_client(url, resolve_admin_key(admin_key)) as client:
        for seq in seqs:
            r = client.replay_dead_letter(seq, keep=keep)
            console.print(f"replayed {seq} to {r['subject']} as {r['msg_id']}", highlight=False)
