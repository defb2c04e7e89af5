"""The multi-process stack the e2e tests run against: the six services as processes, on a
nats-server and a database of their own (Redis and S3 are the session's), with the scripted
model."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kiln_devstack.host import free_port
from kiln_devstack.stack import Stack
from tests.infra import own_database


@contextmanager
def own_stack(
    infra: dict[str, str],
    name: str,
    env: Callable[[Path], dict[str, str]] = lambda data_dir: {},
    *,
    nats_nodes: int = 1,
    replicas: int = 1,
    through: Callable[[str, str], str] = lambda variable, url: url,
) -> Iterator[Stack]:
    """A started stack named ``name`` (its temporary directory and database are named after it);
    ``env``: more environment for it, given its data directory; ``nats_nodes`` 3: on a JetStream
    cluster of its own; ``replicas``: processes of each service; ``through``: the URL the
    services get for DATABASE_URL, REDIS_URL and S3_ENDPOINT_URL, given the real one (e.g. a
    forwarder's). Stopped and removed on exit."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"kiln-{name}-", dir="/tmp"))
    extra = {k: v for k, v in infra.items() if k != "NATS_URL"}
    extra["DATABASE_URL"] = own_database(infra["DATABASE_URL"], f"{name}_{uuid.uuid4().hex[:8]}")
    extra["ANTHROPIC_API_KEY"] = ""  # always the scripted model in tests
    extra.update(env(data_dir))
    for variable in ("DATABASE_URL", "REDIS_URL", "S3_ENDPOINT_URL"):
        extra[variable] = through(variable, extra[variable])
    stack = Stack(
        data_dir,
        gateway_port=free_port(),
        extra_env=extra,
        nats_nodes=nats_nodes,
        replicas=replicas,
    )
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
