"""``python -m kiln_gateway``: the HTTP API on 0.0.0.0:$KILN_GATEWAY_PORT."""

from __future__ import annotations

import uvicorn

from kiln_runtime import log

from .app import create_app
from .settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings()
    log.configure("gateway", settings.log_level, settings.log_json)
    uvicorn.run(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,
        proxy_headers=True,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
