"""The bus's set-up step: create or update Kiln's streams and the budget gates' bucket at
``KILN_STREAM_REPLICAS`` copies, then exit.

It runs as the NATS user ``setup`` (deploy/nats/permissions.yaml), the only one allowed to create
or update streams: ``kiln up`` runs it before the services, a Kubernetes Job in deploy/ before
each rollout. The services only look the streams up (``kiln_runtime.streams.require_streams``).

    NATS_URL=... NATS_USER=setup NATS_PASSWORD=... python -m kiln_runtime.setup
"""

from __future__ import annotations

import asyncio
import logging
import sys

import nats

from .log import configure
from .retry import retry
from .settings import CommonSettings
from .streams import ServerTooOld, ensure_gates, ensure_streams

log = logging.getLogger(__name__)


async def set_up(settings: CommonSettings) -> None:
    """Connect as the settings' user and create or update every stream (a new cluster may not
    have elected a JetStream leader yet: retried for about a minute)."""
    from .bus import servers

    nc = await nats.connect(
        servers(settings.nats_url),
        user=settings.nats_user or None,
        password=(settings.nats_password or "") if settings.nats_user else None,
        name="kiln-setup",
        inbox_prefix="_INBOX_setup",
        connect_timeout=5,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
    )
    try:

        async def once() -> None:
            await ensure_streams(nc, settings.stream_replicas)
            await ensure_gates(nc, settings.stream_replicas)

        await retry(
            once,
            attempts=30,
            retry_on=(Exception,),
            base=0.2,
            cap=3.0,
            give_up=lambda err: isinstance(err, ServerTooOld),
            on_retry=lambda err, n: log.info("streams not set up yet (%s); retrying", err),
        )
        log.info("streams set up at %d replicas", settings.stream_replicas)
    finally:
        await nc.close()


async def set_up_with_retry(settings: CommonSettings) -> None:
    """``set_up``, while the server does not answer yet (not when it refuses the user)."""
    await retry(
        lambda: set_up(settings),
        attempts=30,
        retry_on=(OSError, TimeoutError, nats.errors.NoServersError),
        base=0.2,
        cap=2.0,
        on_retry=lambda err, n: log.warning("NATS not reachable (%s); retrying", err),
    )


def main() -> int:
    settings = CommonSettings()
    configure("setup", settings.log_level, settings.log_json)
    try:
        asyncio.run(set_up_with_retry(settings))
    except Exception as err:
        log.error("the streams could not be set up: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
