"""``kiln say|fork|rollback``: write to a build, fork it at an iteration, go back to one."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import typer

from .client import ApiError
from .following import follow
from .shared import BuildArg, KeyOpt, UrlOpt, console, fail, open_client


def say(
    build_id: BuildArg,
    text: Annotated[str, typer.Argument(help="What to tell the build.")],
    follow_: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Watch the build answer, until its run ends."),
    ] = False,
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Write to a build; a finished one continues with the message.

    A running build reads the message at its next think, a sleeping one when it wakes; a
    completed, failed or cancelled one continues with it, its files restored from its latest
    snapshot. With --follow, watch from the message on (exit 0 only if the build then completes).
    """
    with open_client(url, key) as client:
        sent = client.send_message(build_id, text, idempotency_key=uuid.uuid4().hex)
        console.print(
            f"message {sent['message_id']} (#{sent['seq']}) sent to build {build_id}",
            highlight=False,
        )
        if not follow_:
            return
        status = follow(client, build_id, after_message=sent["message_id"]).status
    raise typer.Exit(0 if status == "completed" else 1)


def _forked(fork: dict[str, Any], source: str) -> str:
    origin = fork.get("forked_from") or {}
    snapshot = origin.get("snapshot_id")
    files = f"files of snapshot {snapshot}" if snapshot else "no files (no snapshot by then)"
    return (
        f"fork [bold]{fork['build_id']}[/] {fork['status']}: build {source} at iteration "
        f"{origin.get('iteration')}, {files}"
    )


def fork(
    build_id: Annotated[str, typer.Argument(help="The build to fork.")],
    at: Annotated[int | None, typer.Option("--at", min=0, help="The iteration to fork at.")] = None,
    snapshot: Annotated[
        str | None, typer.Option("--snapshot", help="Or one of its snapshots (by id).")
    ] = None,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Watch the fork.")] = False,
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Fork a build at an iteration: a new build with its conversation up to there and the
    files of that iteration's snapshot; the build itself is not touched."""
    if (at is None) == (snapshot is None):
        raise fail("give exactly one of --at ITERATION and --snapshot ID")
    with open_client(url, key) as client:
        forked = client.fork(
            build_id, iteration=at, snapshot_id=snapshot, idempotency_key=uuid.uuid4().hex
        )
        console.print(_forked(forked, build_id), highlight=False, soft_wrap=True)
        if not follow_:
            return
        status = follow(client, forked["build_id"]).status
    raise typer.Exit(0 if status == "completed" else 1)


def rollback(
    build_id: Annotated[str, typer.Argument(help="The build to roll back.")],
    to: Annotated[int, typer.Option("--to", min=0, help="The iteration to go back to.")],
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Watch the new build.")] = False,
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Go back to an iteration: fork the build there, then cancel the build (its history and
    snapshots stay). The work goes on in the new build."""
    with open_client(url, key) as client:
        forked = client.fork(build_id, iteration=to, idempotency_key=uuid.uuid4().hex)
        console.print(_forked(forked, build_id), highlight=False, soft_wrap=True)
        try:
            client.command(build_id, "cancel")
            console.print(f"build {build_id} cancelled", highlight=False, soft_wrap=True)
        except ApiError as e:
            if e.status != 409:
                raise
            console.print(
                f"build {build_id} had already ended: {e.detail}", highlight=False, soft_wrap=True
            )
        console.print(
            f"rolled back: continue in build [bold]{forked['build_id']}[/] "
            f"(was {build_id}, now at iteration {to})",
            highlight=False,
            soft_wrap=True,
        )
        if not follow_:
            return
        status = follow(client, forked["build_id"]).status
    raise typer.Exit(0 if status == "completed" else 1)
