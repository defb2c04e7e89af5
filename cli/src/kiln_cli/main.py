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
from rich.table import Table

from kiln_devstack.infra import InfraError
from kiln_devstack.stack import DEV_API_KEY, Stack

from .client import TERMINAL_STATUSES, ApiError, KilnClient
from .render import Renderer, usd

app = typer.Typer(help="Kiln: an autonomous coding agent that builds apps from idea briefs.")
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

UrlOpt = Annotated[str, typer.Option("--url", envvar="KILN_URL", help="The gateway's URL.")]
KeyOpt = Annotated[
    str | None,
    typer.Option("--key", envvar="KILN_API_KEY", help="API key (default: the dev key)."),
]


def _key(key: str | None) -> str:
    return key or os.environ.get("KILN_DEV_API_KEY") or DEV_API_KEY


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


def follow(client: KilnClient, build_id: str, on_idle: Any = None) -> Renderer:
    renderer = Renderer(console)
    for event in client.follow(build_id, on_idle=on_idle):
        renderer(event)
    return renderer


def wait_projected(client: KilnClient, build_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """The build once the gateway's read model has caught up with its end (or as it is)."""
    deadline = time.monotonic() + timeout
    while True:
        build = client.get_build(build_id)
        if build.get("status") in TERMINAL_STATUSES or time.monotonic() > deadline:
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
    url: UrlOpt = "http://127.0.0.1:8080",
    key: KeyOpt = None,
) -> None:
    """Submit a build; with --follow, watch it until it ends (exit 0 only if it completed)."""
    try:
        answers = load_qna(qna) if qna else []
    except (ValueError, KeyError, yaml.YAMLError) as e:
        raise _fail(f"could not read the Q&A: {e}") from None
    with KilnClient(url, _key(key)) as client:
        try:
            created = client.create_build(
                brief.read_text(), answers, idempotency_key=uuid.uuid4().hex
            )
            build_id = created["build_id"]
            console.print(f"build [bold]{build_id}[/] {created['status']}", highlight=False)
            if not follow_:
                return
            status = follow(client, build_id).status
        except ApiError as e:
            raise _fail(e.detail if e.status != 401 else "the API key was refused") from None
        except (OSError, httpx.HTTPError) as e:
            raise _fail(f"cannot reach the gateway at {url}: {e}") from None
    raise typer.Exit(0 if status == "completed" else 1)


@app.command()
def status(
    build_id: Annotated[str, typer.Argument(help="The build's id.")],
    url: UrlOpt = "http://127.0.0.1:8080",
    key: KeyOpt = None,
) -> None:
    """Print a build."""
    with KilnClient(url, _key(key)) as client:
        try:
            _print_build(client.get_build(build_id))
        except ApiError as e:
            raise _fail(e.detail) from None
        except (OSError, httpx.HTTPError) as e:
            raise _fail(f"cannot reach the gateway at {url}: {e}") from None


def _start(data_dir: Path, port: int) -> Stack:
    stack = Stack(data_dir, gateway_port=port)
    with console.status("starting the stack (NATS, Postgres, Redis, S3, five services)…"):
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
) -> None:
    """Start the whole local stack and keep it running until Ctrl-C."""
    with _sigterm_as_interrupt():
        _up(data_dir, port)


def _up(data_dir: Path, port: int) -> None:
    stack = _start(data_dir, port)
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
) -> None:
    """Start the stack, build the bundled "textstats" brief live, and show where it went."""
    with _sigterm_as_interrupt():
        ok = _demo(data_dir, port, timeout)
    raise typer.Exit(0 if ok else 1)


def _demo(data_dir: Path, port: int, timeout: float) -> bool:
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    stack = _start(data_dir, port)
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
            final = wait_projected(c, build_id)
        console.print()
        console.print(f"status     [bold]{status}[/]")
        console.print(f"workspace  {(data_dir / 'sandboxes' / build_id).resolve()}")
        snap = final.get("last_snapshot_id")
        bucket = stack.env.get("KILN_S3_BUCKET", "kiln-snapshots")
        endpoint = stack.env.get("S3_ENDPOINT_URL", "")
        if snap:
            console.print(
                f"snapshot   {snap} in s3://{bucket}/builds/{build_id}/manifests/ ({endpoint})"
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
