"""``kiln up`` and ``kiln demo``: the whole local stack, kept running or driven through one demo
build (and its follow-up) of the bundled brief."""

from __future__ import annotations

import contextlib
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

from kiln_contracts.bucket import manifests_prefix
from kiln_devstack.host import InfraError
from kiln_devstack.stack import DEV_API_KEY, Stack

from .client import ApiError, KilnClient
from .following import follow, wait_projected
from .shared import console, err, fail

DEMO_QNA = [
    {"question": "What should the package be called?", "answer": "textstats"},
    {
        "question": "What should it count?",
        "answer": "Words, lines and characters, and list the most frequent words.",
    },
    {"question": "How should it be tested?", "answer": "With unittest, standard library only."},
    {"question": "Which Python version?", "answer": "Python 3.11, no third-party packages."},
]


SANDBOX_HELP = (
    "The sandbox provider: 'local' (directories on this host) or 'e2b' (the real e2b SDK; "
    "against the local E2B-compatible server unless E2B_API_KEY is set)."
)


# A scripted iteration costs about $0.004: $0.02 a "day" runs out after about five of them.
SHOW_SLEEP_ENV = {"KILN_BUDGET_PERIOD_S": "30", "KILN_BUDGET_DEMO_ALLOWANCE_USD": "0.02"}


DEMO_FOLLOW_UP_FILE = "CHANGELOG.md"


DEMO_FOLLOW_UP = f"add a file {DEMO_FOLLOW_UP_FILE} with # Changelog - first version of textstats"


def _start(
    data_dir: Path, port: int, extra_env: dict[str, str] | None = None, nats_nodes: int = 1
) -> Stack:
    env = extra_env or {}
    if nats_nodes > 1:  # a JetStream cluster on loopback, the streams at three replicas
        stack = Stack(data_dir, gateway_port=port, extra_env=env, nats_nodes=nats_nodes)
    else:
        stack = Stack(data_dir, gateway_port=port, extra_env=env)
    with console.status("starting the stack (NATS, Postgres, Redis, S3, six services)…"):
        try:
            stack.start()
        except InfraError as e:
            raise fail(str(e)) from None
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


def up(
    data_dir: Annotated[Path, typer.Option(help="Where the stack keeps its data.")] = Path(".kiln"),
    port: Annotated[int, typer.Option(help="The gateway's port.")] = 8080,
    sandbox: Annotated[str, typer.Option(help=SANDBOX_HELP)] = "local",
    nats_nodes: Annotated[
        int,
        typer.Option(
            min=1,
            help="nats-server processes: 3 for a JetStream cluster on loopback, streams at 3 "
            "replicas (ignored when NATS_URL is given).",
        ),
    ] = 1,
) -> None:
    """Start the whole local stack and keep it running until Ctrl-C."""
    with _sigterm_as_interrupt():
        _up(data_dir, port, _sandbox_env(sandbox), nats_nodes)


def _sandbox_env(sandbox: str) -> dict[str, str]:
    if sandbox not in ("local", "e2b"):
        raise fail(f"--sandbox must be 'local' or 'e2b', not {sandbox!r}")
    return {"KILN_SANDBOX_PROVIDER": sandbox} if sandbox == "e2b" else {}


def _up(
    data_dir: Path, port: int, extra_env: dict[str, str] | None = None, nats_nodes: int = 1
) -> None:
    stack = _start(data_dir, port, extra_env, nats_nodes=nats_nodes)
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
