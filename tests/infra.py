"""Where the tests' infrastructure comes from: a URL from the environment, else testcontainers
when a Docker engine answers, else the embedded servers (kiln_devstack)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from kiln_devstack.infra import Infra, set_up_streams

log = logging.getLogger(__name__)

KEYS = ("NATS_URL", "DATABASE_URL", "REDIS_URL", "S3_ENDPOINT_URL")


def docker_available() -> bool:
    if os.environ.get("KILN_TEST_NO_DOCKER"):
        return False
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def _containers(missing: list[str]) -> Iterator[dict[str, str]]:
    """Start what is missing with testcontainers (used where a Docker engine runs)."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs
    from testcontainers.minio import MinioContainer
    from testcontainers.postgres import PostgresContainer
    from testcontainers.redis import RedisContainer

    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        if "NATS_URL" in missing:
            nats = stack.enter_context(
                DockerContainer("nats:2.12-alpine").with_command("-js").with_exposed_ports(4222)
            )
            wait_for_logs(nats, "Server is ready")
            urls["NATS_URL"] = (
                f"nats://{nats.get_container_host_ip()}:{nats.get_exposed_port(4222)}"
            )
        if "DATABASE_URL" in missing:
            pg = stack.enter_context(PostgresContainer("postgres:16-alpine", driver=None))
            urls["DATABASE_URL"] = pg.get_connection_url()
        if "REDIS_URL" in missing:
            rd = stack.enter_context(RedisContainer("redis:7-alpine"))
            urls["REDIS_URL"] = (
                f"redis://{rd.get_container_host_ip()}:{rd.get_exposed_port(6379)}/0"
            )
        if "S3_ENDPOINT_URL" in missing:
            mn = stack.enter_context(MinioContainer())
            cfg = mn.get_config()
            urls["S3_ENDPOINT_URL"] = f"http://{cfg['endpoint']}"
            urls["AWS_ACCESS_KEY_ID"] = cfg["access_key"]
            urls["AWS_SECRET_ACCESS_KEY"] = cfg["secret_key"]
        yield urls


@contextlib.contextmanager
def infrastructure(data_dir: Path) -> Iterator[dict[str, str]]:
    given = {k: os.environ[k] for k in KEYS if os.environ.get(k)}
    missing = [k for k in KEYS if k not in given]
    if missing and docker_available():
        with _containers(missing) as urls:
            set_up_streams(urls.get("NATS_URL") or given["NATS_URL"], 1, data_dir / "logs")
            yield {**given, **urls}
        return
    if "NATS_URL" in given:  # a server of the environment's: the bus's set-up step first
        set_up_streams(given["NATS_URL"], 1, data_dir / "logs")
    infra = Infra(data_dir)
    try:
        yield infra.start(given)
    finally:
        infra.stop()


def own_database(url: str, name: str) -> str:
    """A fresh database on the session's Postgres, so other tests' rows stay out of this stack."""

    async def create() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))
