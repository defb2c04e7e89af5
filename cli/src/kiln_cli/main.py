"""The ``kiln`` command: run the local stack, submit builds and follow them live.

The commands live in a module per group (``builds``, ``conversation``, ``admin``, ``local``,
``webhooks``); this one puts them together.
"""

from __future__ import annotations

import typer

from . import admin, builds, conversation, local
from .webhooks import webhooks_app

app = typer.Typer(
    help="Kiln: an autonomous coding agent that builds apps from idea briefs; write to a build "
    "to steer it, or to continue it once it has finished."
)
app.command()(builds.build)
app.command()(builds.status)
app.command("list")(builds.list_)
app.command()(builds.logs)
app.command()(conversation.say)
app.command()(conversation.fork)
app.command()(conversation.rollback)
app.command()(builds.wake)
app.command()(builds.cancel)
app.command()(builds.download)
app.command()(builds.budget)
app.add_typer(admin.keys_app, name="keys")
app.add_typer(admin.dlq_app, name="dlq")
app.command()(local.up)
app.command()(local.demo)
app.add_typer(webhooks_app, name="webhooks")

if __name__ == "__main__":
    app()
