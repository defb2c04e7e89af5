"""Kiln's streams on JetStream: ``KILN`` (every build's messages), ``KILN_DLQ`` (dead letters)
and the budget gates' key-value bucket.

They are created or updated by the set-up step only (``kiln_runtime.setup``, as the NATS user
``setup``: ``kiln up`` runs it, and a Kubernetes Job in deploy/); the services' users may look
them up, never create, update or delete them (deploy/nats/permissions.yaml)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from nats.aio.client import Client
from nats.js.api import DiscardPolicy, StreamConfig
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from kiln_contracts import subjects

log = logging.getLogger(__name__)

MIN_SERVER = (2, 12)


class ServerTooOld(RuntimeError):
    pass


class StreamsMissing(RuntimeError):
    """A stream or the gates' bucket does not exist yet: the set-up step has not run."""


def check_server(nc: Client) -> None:
    version = nc.connected_server_version
    if (version.major, version.minor) < MIN_SERVER:
        raise ServerTooOld(
            f"nats-server {version} is too old: Kiln needs >= {MIN_SERVER[0]}.{MIN_SERVER[1]} "
            "with JetStream (message schedules). Point NATS_URL at a newer server."
        )


SETUP_HINT = "the set-up step creates it: python -m kiln_runtime.setup (docs/OPERATIONS.md)"


async def require_streams(nc: Client) -> None:
    """Check the server can do what Kiln needs and that Kiln's streams exist (a service's
    start-up: it may look the streams up, not create them)."""
    check_server(nc)
    js = nc.jetstream()
    for name in (subjects.STREAM, subjects.DLQ_STREAM, f"KV_{subjects.BUDGET_GATES}"):
        try:
            await js.stream_info(name)
        except NotFoundError as err:
            raise StreamsMissing(f"stream {name} does not exist; {SETUP_HINT}") from err


def stream_config(replicas: int = 1) -> StreamConfig:
    """``KILN``: its messages no larger than the contracts allow, its wakes message schedules."""
    return _kiln_stream(
        subjects.STREAM,
        subjects.STREAM_SUBJECTS,
        replicas,
        max_msg_size=subjects.MAX_MSG_BYTES,
        allow_msg_schedules=True,
    )


def dlq_stream_config(replicas: int = 1) -> StreamConfig:
    """``KILN_DLQ``: the dead letters."""
    return _kiln_stream(subjects.DLQ_STREAM, subjects.DLQ_SUBJECTS, replicas)


def _kiln_stream(
    name: str,
    stream_subjects: Iterable[str],
    replicas: int,
    *,
    max_msg_size: int = -1,  # nats-py's default: no limit of the stream's own
    allow_msg_schedules: bool | None = None,
) -> StreamConfig:
    """What Kiln's two streams share: the duplicate window and the age messages are kept."""
    return StreamConfig(
        num_replicas=replicas,
        name=name,
        subjects=list(stream_subjects),
        duplicate_window=subjects.DUPLICATE_WINDOW_S,
        max_msg_size=max_msg_size,
        max_age=subjects.MAX_AGE_S,
        allow_msg_schedules=allow_msg_schedules,
    )


async def ensure_streams(nc: Client, replicas: int = 1) -> None:
    """Check the server can do what Kiln needs, then create or update Kiln's streams (the set-up
    step; tests that stand in for it)."""
    check_server(nc)
    js = nc.jetstream()
    for config in (stream_config(replicas), dlq_stream_config(replicas)):
        try:
            await js.stream_info(config.name or "")
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)


def gates_stream_config(replicas: int = 1) -> StreamConfig:
    """The stream behind the budget gates' key-value bucket, as nats-py's ``create_key_value``
    makes one (one value per key, rollups, no deletes of single messages), with Kiln's replicas.
    No direct gets: every read is answered by the stream's leader, so it sees the last write."""
    bucket = subjects.BUDGET_GATES
    return StreamConfig(
        name=f"KV_{bucket}",
        subjects=[f"$KV.{bucket}.>"],
        num_replicas=replicas,
        max_msgs_per_subject=1,
        max_msgs=-1,
        max_consumers=-1,
        max_age=subjects.BUDGET_GATES_MAX_AGE_S,
        max_msg_size=subjects.BUDGET_GATES_MAX_VALUE_BYTES,
        discard=DiscardPolicy.NEW,
        duplicate_window=120.0,
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_direct=False,
    )


async def bind_gates(nc: Client) -> KeyValue:
    """The budget gates' bucket, which the set-up step made (a service's start-up)."""
    try:
        return await nc.jetstream().key_value(subjects.BUDGET_GATES)
    except NotFoundError as err:  # nats-py's BucketNotFoundError is one
        raise StreamsMissing(
            f"bucket {subjects.BUDGET_GATES} does not exist; {SETUP_HINT}"
        ) from err


async def ensure_gates(nc: Client, replicas: int = 1) -> KeyValue:
    """Create or update the budget gates' bucket (the set-up step) and bind to it."""
    js = nc.jetstream()
    config = gates_stream_config(replicas)
    try:
        await js.stream_info(config.name or "")
        await js.update_stream(config)
    except NotFoundError:
        await js.add_stream(config)
    return await js.key_value(subjects.BUDGET_GATES)
