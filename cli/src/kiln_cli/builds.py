"""``kiln build|status|list|logs|wake|cancel|download|budget``: submit, read and steer builds."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from .following import follow, load_qna, print_build
from .render import Renderer, usd
from .shared import BuildArg, KeyOpt, UrlOpt, console, fail, open_client


def build(
    brief: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The idea brief.")],
    qna: Annotated[
        Path | None,
        typer.Option("--qna", exists=True, dir_okay=False, help="Understanding Q&A (YAML)."),
    ] = None,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Watch it live.")] = False,
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Submit a build; with --follow, watch it until it ends (exit 0 only if it completed)."""
    try:
        answers = load_qna(qna) if qna else []
    except (ValueError, KeyError, yaml.YAMLError) as e:
        raise fail(f"could not read the Q&A: {e}") from None
    with open_client(url, key) as client:
        created = client.create_build(brief.read_text(), answers, idempotency_key=uuid.uuid4().hex)
        build_id = created["build_id"]
        console.print(f"build [bold]{build_id}[/] {created['status']}", highlight=False)
        if not follow_:
            return
        status = follow(client, build_id).status
    raise typer.Exit(0 if status == "completed" else 1)


def status(build_id: BuildArg, url: UrlOpt = None, key: KeyOpt = None) -> None:
    """Print a build."""
    with open_client(url, key) as client:
        print_build(client.get_build(build_id))


def list_(
    status_: Annotated[
        str | None, typer.Option("--status", help="Only builds in this status.")
    ] = None,
    limit: Annotated[int, typer.Option(help="How many (newest first).")] = 20,
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """List your builds, newest first."""
    with open_client(url, key) as client:
        builds: list[dict[str, Any]] = []
        cursor = None
        while len(builds) < limit:
            page = client.list_builds(status_, min(100, limit - len(builds)), cursor)
            builds += page["builds"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
    console.print(builds_table(builds))


def builds_table(builds: list[dict[str, Any]]) -> Table:
    """The builds, their ids whole at any terminal width (an id is for copying: the other
    columns wrap first, and the table overflows rather than cut an id)."""
    table = Table()
    id_width = max((len(str(b["build_id"])) for b in builds), default=5)
    table.add_column("build", no_wrap=True, min_width=id_width, overflow="fold")
    for name in ("status", "iter", "cost", "created"):
        table.add_column(name)
    for b in builds:
        table.add_row(
            b["build_id"],
            b["status"],
            str(b["iteration"]),
            usd(int(b["cost_micro_usd"])),
            str(b["created_at"])[:19],
        )
    return table


def logs(
    build_id: BuildArg,
    follow_: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep watching until the build ends.")
    ] = False,
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Print the build's events so far (with --follow: live, until it ends)."""
    with open_client(url, key) as client:
        if follow_:
            follow(client, build_id)
            return
        renderer = Renderer(console)
        # the server ends the stream after the end of the build's current run (the ends of
        # runs it continued from pass by); a heartbeat: the history is all sent
        for event in client.events(build_id):
            if not event.kind:
                break
            renderer(event)


def _command(build_id: str, what: str, url: str | None, key: str | None) -> None:
    with open_client(url, key) as client:
        client.command(build_id, what)
    console.print(f"{what} requested for {build_id}", highlight=False)


def wake(build_id: BuildArg, url: UrlOpt = None, key: KeyOpt = None) -> None:
    """Wake a sleeping build now."""
    _command(build_id, "wake", url, key)


def cancel(build_id: BuildArg, url: UrlOpt = None, key: KeyOpt = None) -> None:
    """Cancel a build."""
    _command(build_id, "cancel", url, key)


def download(
    build_id: BuildArg,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Default: kiln-<build>.tar.gz")
    ] = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Download the build's files (its latest snapshot) as a .tar.gz."""
    target = output or Path(f"kiln-{build_id}.tar.gz")
    partial = target.with_name(target.name + ".part")
    try:
        with open_client(url, key) as client, partial.open("wb") as out:
            size = client.download(build_id, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    console.print(f"{target} ({size} bytes)", highlight=False)


def budget(url: UrlOpt = None, key: KeyOpt = None) -> None:
    """Your spend today and this month, and today's allowance."""
    with open_client(url, key) as client:
        b = client.budget()
    table = Table(show_header=False, box=None)
    table.add_row("user", f"{b['user_id']} (tier {b['tier']})")
    table.add_row(
        "today", f"{usd(b['spent_today_micro_usd'])} of {usd(b['daily_allowance_micro_usd'])}"
    )
    table.add_row(
        "this month", f"{usd(b['spent_month_micro_usd'])} of {usd(b['monthly_budget_micro_usd'])}"
    )
    table.add_row("per-build cap", usd(b["per_build_cap_micro_usd"]))
    table.add_row("concurrent builds", str(b["concurrent_builds"]))
    console.print(table)
