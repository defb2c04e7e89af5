"""The ``kiln`` command: run the local stack, submit builds and follow them live."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kiln_contracts.bucket import manifests_prefix
from kiln_devstack.infra import InfraError
from kiln_devstack.stack import DEV_API_KEY, Stack

from . import config as cli_config
from .client import TERMINAL_STATUSES, ApiError, KilnClient
from .render import Renderer, usd

app = typer.Typer(
    help="Kiln: an autonomous coding agent that builds apps from idea briefs; write to a build "
    "to steer it, or to continue it once it has finished."
)
console = Console()
err = Console(stderr=True)

DEMO_QNA = [
    {"question": "What should the package be called?", "answer": "textstats"},
    {
        "question": "What should it count?",
        "answer": "Words, lines and characters, and list the most frequent words.",
    },
    {"question": "How should it be tested?", "answer": "With unittest, standard library only."},
    {"question": "Which Python version?", "answer": "Python 3.11, no third-party packages."},
]

UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="KILN_URL", help="The gateway's URL (else config.toml's url, else local)."
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        envvar="KILN_API_KEY",
        help="API key (else config.toml's api_key, else the local dev key).",
    ),
]
AdminOpt = Annotated[
    str | None,
    typer.Option(
        "--admin-key", envvar="KILN_ADMIN_API_KEY", help="Admin key (else config.toml's admin_key)."
    ),
]
keys_app = typer.Typer(help="API keys (admin): create, revoke, list.")
app.add_typer(keys_app, name="keys")
dlq_app = typer.Typer(help="Dead letters (admin): list, show, replay.")
app.add_typer(dlq_app, name="dlq")


def _key(key: str | None) -> str:
    try:
        found = cli_config.resolve(key, "api_key")
    except ValueError as e:
        raise _fail(str(e)) from None
    return found or os.environ.get("KILN_DEV_API_KEY") or DEV_API_KEY


def _url(url: str | None) -> str:
    try:
        return cli_config.resolve(url, "url", cli_config.DEFAULT_URL) or cli_config.DEFAULT_URL
    except ValueError as e:
        raise _fail(str(e)) from None


@contextlib.contextmanager
def _client(url: str | None, key: str | None) -> Iterator[KilnClient]:
    """A client; API errors and unreachable gateways end the command with a clear message."""
    base = _url(url)
    try:
        with KilnClient(base, _key(key)) as client:
            yield client
    except ApiError as e:
        raise _fail(e.detail if e.status != 401 else f"the key was refused ({e.detail})") from None
    except (OSError, httpx.HTTPError) as e:
        raise _fail(f"cannot reach the gateway at {base}: {e}") from None


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(1)


def load_qna(path: Path) -> list[dict[str, str]]:
    """Q&A from YAML: a list of {question, answer}, or a mapping question -> answer."""
    doc = yaml.safe_load(path.read_text()) or []
    if isinstance(doc, dict):
        doc = doc.get("understanding_qna", doc)
    if isinstance(doc, dict):
        return [{"question": str(q), "answer": str(a)} for q, a in doc.items()]
    if isinstance(doc, list) and all(isinstance(x, dict) for x in doc):
        return [{"question": str(x["question"]), "answer": str(x.get("answer", ""))} for x in doc]
    raise ValueError(f"{path}: expected a list of {{question, answer}} or a mapping")


def follow(
    client: KilnClient, build_id: str, on_idle: Any = None, after_message: str | None = None
) -> Renderer:
    """Render the build's events live, under a status line: iteration, current tool, cost vs
    the day's allowance, sleeping or waking. ``after_message``: a message id; the events from
    that message on are shown, until the end of the run that answers it."""
    renderer = Renderer(console)
    renderer.quiet = after_message is not None
    allowance = _allowance(client)
    with console.status(progress_line(renderer, allowance)) as line:
        for event in client.follow(build_id, on_idle=on_idle, after_message=after_message):
            if event.kind == "send_user_message" and event.data.get("message_id") == after_message:
                renderer.quiet = False
            renderer(event)
            if event.kind == "iteration_completed":
                allowance = _allowance(client) or allowance
            line.update(progress_line(renderer, allowance))
    return renderer


def _allowance(client: KilnClient) -> dict[str, Any] | None:
    try:
        return client.budget()
    except (ApiError, httpx.HTTPError, ValueError):
        return None


def progress_line(r: Renderer, budget: dict[str, Any] | None) -> str:
    state = {"sleeping": "💤 sleeping", None: "starting"}.get(r.status, r.status or "")
    if r.status == "running" and r.woken:
        state = "⏰ woken, running"
    tool = f" · tool [bold]{escape(r.tool)}[/]" if r.tool and r.status == "running" else ""
    cost = usd(r.cost_micro_usd)
    if budget:
        spent = usd(int(budget.get("spent_today_micro_usd", 0)))
        allowance = usd(int(budget.get("daily_allowance_micro_usd", 0)))
        cost += f" (today {spent} of {allowance} allowance)"
    return f"{state} · iteration {r.iteration}{tool} · cost {cost}"


def wait_projected(
    client: KilnClient, build_id: str, timeout: float = 15.0, *, snapshot: bool = False
) -> dict[str, Any]:
    """The build once the gateway's read model has caught up with its end (or as it is);
    ``snapshot``: and with a snapshot of its files (the final one is taken after the end)."""
    deadline = time.monotonic() + timeout
    while True:
        build = client.get_build(build_id)
        done = build.get("status") in TERMINAL_STATUSES
        if (
            done and (build.get("last_snapshot_id") or not snapshot)
        ) or time.monotonic() > deadline:
            return build
        time.sleep(0.2)


def _print_build(b: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    for key in ("build_id", "status", "tier", "iteration"):
        table.add_row(key, str(b.get(key)))
    table.add_row("cost", usd(int(b.get("cost_micro_usd") or 0)))
    for key in ("last_snapshot_id", "summary", "reason", "created_at", "finished_at"):
        if b.get(key):
            table.add_row(key, str(b[key]))
    console.print(table)


# ---------------------------------------------------------------------------- commands


@app.command()
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
        raise _fail(f"could not read the Q&A: {e}") from None
    with _client(url, key) as client:
        created = client.create_build(brief.read_text(), answers, idempotency_key=uuid.uuid4().hex)
        build_id = created["build_id"]
        console.print(f"build [bold]{build_id}[/] {created['status']}", highlight=False)
        if not follow_:
            return
        status = follow(client, build_id).status
    raise typer.Exit(0 if status == "completed" else 1)


@app.command()
def status(
    build_id: Annotated[str, typer.Argument(help="The build's id.")],
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Print a build."""
    with _client(url, key) as client:
        _print_build(client.get_build(build_id))


@app.command("list")
def list_(
    status_: Annotated[
        str | None, typer.Option("--status", help="Only builds in this status.")
    ] = None,
    limit: Annotated[int, typer.Option(help="How many (newest first).")] = 20,
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """List your builds, newest first."""
    with _client(url, key) as client:
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


@app.command()
def logs(
    build_id: Annotated[str, typer.Argument(help="The build's id.")],
    follow_: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep watching until the build ends.")
    ] = False,
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Print the build's events so far (with --follow: live, until it ends)."""
    with _client(url, key) as client:
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


@app.command()
def say(
    build_id: Annotated[str, typer.Argument(help="The build's id.")],
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
    with _client(url, key) as client:
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


@app.command()
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
        raise _fail("give exactly one of --at ITERATION and --snapshot ID")
    with _client(url, key) as client:
        forked = client.fork(
            build_id, iteration=at, snapshot_id=snapshot, idempotency_key=uuid.uuid4().hex
        )
        console.print(_forked(forked, build_id), highlight=False, soft_wrap=True)
        if not follow_:
            return
        status = follow(client, forked["build_id"]).status
    raise typer.Exit(0 if status == "completed" else 1)


@app.command()
def rollback(
    build_id: Annotated[str, typer.Argument(help="The build to roll back.")],
    to: Annotated[int, typer.Option("--to", min=0, help="The iteration to go back to.")],
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Watch the new build.")] = False,
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Go back to an iteration: fork the build there, then cancel the build (its history and
    snapshots stay). The work goes on in the new build."""
    with _client(url, key) as client:
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


@app.command()
def wake(
    build_id: Annotated[str, typer.Argument(help="The build's id.")],
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Wake a sleeping build now."""
    with _client(url, key) as client:
        client.command(build_id, "wake")
    console.print(f"wake requested for {build_id}", highlight=False)


@app.command()
def cancel(
    build_id: Annotated[str, typer.Argument(help="The build's id.")],
    url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Cancel a build."""
    with _client(url, key) as client:
        client.command(build_id, "cancel")
    console.print(f"cancel requested for {build_id}", highlight=False)


@app.command()
def download(
    build_id: Annotated[str, typer.Argument(help="The build's id.")],
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
        with _client(url, key) as client, partial.open("wb") as out:
            size = client.download(build_id, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    console.print(f"{target} ({size} bytes)", highlight=False)


@app.command()
def budget(url: UrlOpt = None, key: KeyOpt = None) -> None:
    """Your spend today and this month, and today's allowance."""
    with _client(url, key) as client:
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


def _admin_key(admin_key: str | None) -> str:
    try:
        found = cli_config.resolve(admin_key, "admin_key")
    except ValueError as e:
        raise _fail(str(e)) from None
    if not found:
        raise _fail(
            "an admin key is needed: --admin-key, KILN_ADMIN_API_KEY or admin_key in config.toml"
        )
    return found


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Option("--user", help="The user the key belongs to.")],
    tier: Annotated[str, typer.Option("--tier", help="free, pro, team ... (kiln.yaml)")] = "free",
    url: UrlOpt = None,
    admin_key: AdminOpt = None,
) -> None:
    """Create an API key; it is printed once and only its hash is stored."""
    with _client(url, _admin_key(admin_key)) as client:
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
    with _client(url, _admin_key(admin_key)) as client:
        k = client.revoke_key(ident)
    console.print(f"revoked {k['key_id']} ({k['user_id']})", highlight=False)


@keys_app.command("list")
def keys_list(
    user: Annotated[str | None, typer.Option("--user")] = None,
    url: UrlOpt = None,
    admin_key: AdminOpt = None,
) -> None:
    """List API keys (never the keys themselves)."""
    with _client(url, _admin_key(admin_key)) as client:
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
    with _client(url, _admin_key(admin_key)) as client:
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
    with _client(url, _admin_key(admin_key)) as client:
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
    with _client(url, _admin_key(admin_key)) as client:
        for seq in seqs:
            r = client.replay_dead_letter(seq, keep=keep)
            console.print(f"replayed {seq} to {r['subject']} as {r['msg_id']}", highlight=False)


def _start(data_dir: Path, port: int, extra_env: dict[str, str] | None = None) -> Stack:
    stack = Stack(data_dir, gateway_port=port, extra_env=extra_env or {})
    with console.status("starting the stack (NATS, Postgres, Redis, S3, six services)…"):
        try:
            stack.start()
        except InfraError as e:
            raise _fail(str(e)) from None
    return stack


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops like Ctrl-C (the stack is stopped on the way out)."""

    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(help="Where the stack keeps its data.")] = Path(".kiln"),
    port: Annotated[int, typer.Option(help="The gateway's port.")] = 8080,
    sandbox: Annotated[str, typer.Option(help=SANDBOX_HELP)] = "local",
) -> None:
    """Start the whole local stack and keep it running until Ctrl-C."""
    with _sigterm_as_interrupt():
        _up(data_dir, port, _sandbox_env(sandbox))


SANDBOX_HELP = (
    "The sandbox provider: 'local' (directories on this host) or 'e2b' (the real e2b SDK; "
    "against the local E2B-compatible server unless E2B_API_KEY is set)."
)


def _sandbox_env(sandbox: str) -> dict[str, str]:
    if sandbox not in ("local", "e2b"):
        raise _fail(f"--sandbox must be 'local' or 'e2b', not {sandbox!r}")
    return {"KILN_SANDBOX_PROVIDER": sandbox} if sandbox == "e2b" else {}


def _up(data_dir: Path, port: int, extra_env: dict[str, str] | None = None) -> None:
    stack = _start(data_dir, port, extra_env)
    try:
        console.print(f"gateway   [bold]{stack.gateway_url}[/]  (docs: {stack.gateway_url}/docs)")
        console.print(f"API key   [bold]{stack.env.get('KILN_DEV_API_KEY', DEV_API_KEY)}[/]")
        console.print(f"data dir  {data_dir.resolve()}  (logs in {data_dir.resolve() / 'logs'})")
        console.print("Ctrl-C stops it.")
        reported: set[str] = set()
        while True:
            time.sleep(1)
            for name, proc in getattr(stack, "services", {}).items():
                if not proc.alive() and name not in reported:
                    reported.add(name)
                    err.print(f"[red]{name} exited:[/]\n{proc.tail()}", highlight=False)
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        stack.stop()


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="Wiped and used for this run.")] = Path(
        ".kiln/demo"
    ),
    port: Annotated[int, typer.Option(help="The gateway's port.")] = 8080,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 900,
    show_sleep: Annotated[
        bool,
        typer.Option(
            "--show-sleep",
            help="Give the user a tiny daily allowance over 30-second 'days', so the build "
            "sleeps when it is spent and wakes by itself when the next 'day' begins.",
        ),
    ] = False,
    sandbox: Annotated[str, typer.Option(help=SANDBOX_HELP)] = "local",
) -> None:
    """Start the stack, build the bundled "textstats" brief live, and show where it went."""
    extra = {**(SHOW_SLEEP_ENV if show_sleep else {}), **_sandbox_env(sandbox)}
    with _sigterm_as_interrupt():
        ok = _demo(data_dir, port, timeout, extra)
    raise typer.Exit(0 if ok else 1)


# A scripted iteration costs about $0.004: $0.02 a "day" runs out after about five of them.
SHOW_SLEEP_ENV = {"KILN_BUDGET_PERIOD_S": "30", "KILN_BUDGET_DEMO_ALLOWANCE_USD": "0.02"}


DEMO_FOLLOW_UP_FILE = "CHANGELOG.md"
DEMO_FOLLOW_UP = f"add a file {DEMO_FOLLOW_UP_FILE} with # Changelog - first version of textstats"


def _follow_up(client: KilnClient, build_id: str, on_idle: Any) -> str:
    """Continue the completed build once, as a user would: a follow-up message, then the run
    that answers it, shown live. Its final status."""
    console.print()
    console.print(f"[bold]follow-up:[/] {DEMO_FOLLOW_UP!r}", highlight=False)
    sent = client.send_message(build_id, DEMO_FOLLOW_UP, idempotency_key=uuid.uuid4().hex)
    return follow(client, build_id, on_idle=on_idle, after_message=sent["message_id"]).status or ""


def _demo(data_dir: Path, port: int, timeout: float, extra_env: dict[str, str]) -> bool:
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    stack = _start(data_dir, port, extra_env)
    deadline = time.monotonic() + timeout

    def on_idle() -> None:
        stack.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the build did not finish within {timeout:.0f}s")

    try:
        brief = resources.files("kiln_cli").joinpath("demo_brief.md").read_text()
        with KilnClient(stack.gateway_url, stack.env.get("KILN_DEV_API_KEY", DEV_API_KEY)) as c:
            created = c.create_build(brief, DEMO_QNA, idempotency_key=uuid.uuid4().hex)
            build_id = created["build_id"]
            status = follow(c, build_id, on_idle=on_idle).status
            if status == "completed":
                status = _follow_up(c, build_id, on_idle)
            final = wait_projected(c, build_id, timeout=30, snapshot=True)
        workspace = (data_dir / "sandboxes" / build_id).resolve()
        console.print()
        console.print(f"status     [bold]{status}[/]")
        console.print(f"workspace  {workspace}")
        if (workspace / DEMO_FOLLOW_UP_FILE).is_file():
            console.print(f"follow-up  {workspace / DEMO_FOLLOW_UP_FILE} (written on request)")
        snap = final.get("last_snapshot_id")
        bucket = stack.env.get("KILN_S3_BUCKET", "kiln-snapshots")
        endpoint = stack.env.get("S3_ENDPOINT_URL", "")
        if snap:
            console.print(
                f"snapshot   {snap} in s3://{bucket}/{manifests_prefix(build_id)} ({endpoint})"
            )
        else:
            console.print("snapshot   none yet")
        ok = status == "completed"
    except (InfraError, TimeoutError, ApiError, httpx.HTTPError) as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        ok = False
    except KeyboardInterrupt:
        ok = False
    finally:
        stack.stop()
    return ok


if __name__ == "__main__":
    app()


# The webhooks commands (kiln_cli.webhooks) use the helpers above.
from .webhooks import webhooks_app  # noqa: E402

app.add_typer(webhooks_app, name="webhooks")
