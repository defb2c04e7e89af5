"""``python -m kiln_snapshot``: run the snapshot service (NATS_URL, S3_ENDPOINT_URL, KILN_S3_BUCKET)."""

from __future__ import annotations

import asyncio

from kiln_runtime import log

from .bootstrap import run
from .settings import SnapshotSettings


def main() -> None:
    settings = SnapshotSettings()
    log.configure("snapshot", settings.log_level, settings.log_json)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
