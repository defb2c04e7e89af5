"""What every ``kiln`` command shares: the consoles, the ``--url``/``--key``/``--admin-key``
options and how they resolve (flag, environment, config.toml, the local defaults), the client,
and how a command fails."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Annotated

import httpx
import typer
from rich.console import Console

from kiln_devstack.stack import DEV_API_KEY

from . import config as cli_config
from .client import ApiError, KilnClient

console = Console()


err = Console(stderr=True)


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


BuildArg = Annotated[str, typer.Argument(help="The build's id.")]


AdminOpt = Annotated[
    str | None,
    typer.Option(
        "--admin-key", envvar="KILN_ADMIN_API_KEY", help="Admin key (else config.toml's admin_key)."
    ),
]


def _api_key(key: str | None) -> str:
    try:
        found = cli_config.resolve(key, "api_key")
    except ValueError as e:
        raise fail(str(e)) from None
    return found or os.environ.get("KILN_DEV_API_KEY") or DEV_API_KEY


def _url(url: str | None) -> str:
    try:
        return cli_config.resolve(url, "url", cli_config.DEFAULT_URL) or cli_config.DEFAULT_URL
    except ValueError as e:
        raise fail(str(e)) from None


@contextlib.contextmanager
def open_client(url: str | None, key: str | None) -> Iterator[KilnClient]:
    """A client; API errors and unreachable gateways end the command with a clear message."""
    base = _url(url)
    try:
        with KilnClient(base, _api_key(key)) as client:
            yield client
    except ApiError as e:
        raise fail(e.detail if e.status != 401 else f"the key was refused ({e.detail})") from None
    except (OSError, httpx.HTTPError) as e:
        raise fail(f"cannot reach the gateway at {base}: {e}") from None


def fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(1)


def resolve_admin_key(admin_key: str | None) -> str:
    try:
        found = cli_config.resolve(admin_key, "admin_key")
    except ValueError as e:
        raise fail(str(e)) from None
    if not found:
        raise fail(
            "an admin key is needed: --admin-key, KILN_ADMIN_API_KEY or admin_key in config.toml"
        )
    return found
