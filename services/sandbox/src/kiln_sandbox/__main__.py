"""``python -m kiln_sandbox``: run the sandbox service until SIGTERM."""

from __future__ import annotations

import asyncio

from kiln_runtime import log

from .bootstrap import run
from .settings import SandboxSettings


def main() -> None:
    settings = SandboxSettings()
    log.configure("sandbox", settings.log_level, settings.log_json)
    if settings.sandbox_uvloop:
        import uvloop

        uvloop.run(run(settings))
    else:
        asyncio.run(run(settings))


if __name__ == "__main__":
    main()
