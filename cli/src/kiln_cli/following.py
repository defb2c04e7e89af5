"""Watching a build: its events rendered live under a status line, and the build once the
read model has caught up; the Q&A file a build is submitted with."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.markup import escape
from rich.table import Table

from .client import TERMINAL_STATUSES, ApiError, KilnClient
from .render import Renderer, usd
from .shared import console


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
    renderer.preview_link = lambda d: client.preview_url(build_id, d)
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


def print_build(b: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    for key in ("build_id", "status", "tier", "iteration"):
        table.add_row(key, str(b.get(key)))
    table.add_row("cost", usd(int(b.get("cost_micro_usd") or 0)))
    for key in ("last_snapshot_id", "summary", "reason", "created_at", "finished_at"):
        if b.get(key):
            table.add_row(key, str(b[key]))
    console.print(table)
