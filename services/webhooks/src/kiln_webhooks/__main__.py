"""``python -m kiln_webhooks``: run the webhooks service (NATS_URL, DATABASE_URL)."""

from __future__ import annotations

import asyncio

from kiln_runtime import log

from .bootstrap import run
from .settings import WebhooksSettings


def main() -> None:
    settings = WebhooksSettings()
    log.configure("webhooks", settings.log_level, settings.log_json)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
