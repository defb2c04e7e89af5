"""The bus's set-up on real servers: a service finds no streams until the set-up step has made
them (on a three-node cluster, at three replicas); a message published without ``event_id`` (an
outside producer's JSON) gets one id that every consumer agrees on: from its ``Nats-Msg-Id``,
else from its sequence on the stream."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from kiln_contracts import BuildRequested, Envelope, stable_id, subjects
from kiln_devstack.cluster import NatsCluster
from kiln_devstack.infra import Infra
from kiln_runtime.bus import Bus, Delivery
from kiln_runtime.settings import CommonSettings
from kiln_runtime.setup import set_up
from kiln_runtime.streams import StreamsMissing

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    """A nats-server of this module's own (its consumers replay no other test's messages)."""
    data_dir = Path(tempfile.mkdtemp(prefix="kiln-ids-", dir="/tmp"))
    infra = Infra(data_dir)
    try:
        yield infra.start_nats()  # with the set-up step: the streams exist
    finally:
        infra.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_consumers_agree_on_the_id_of_a_message_without_one(nats_url, uid):
    seen: dict[str, dict[str, uuid.UUID]] = {"agent": {}, "budget": {}}

    def recorder(service: str):
        async def handle(msg: Envelope, delivery: Delivery) -> None:
            seen[service][msg.build_id] = msg.event_id

        return handle

    buses = {name: Bus(CommonSettings(nats_url=nats_url), name) for name in seen}
    for name, bus in buses.items():
        bus.consume(BuildRequested, recorder(name))
    producer = await nats.connect(nats_url)
    try:
        for bus in buses.values():
            await bus.connect()
            await bus.start()
        js = producer.jetstream()
        body = b'{"build_id": "%s", "user_id": "u1", "idea_brief": "from outside"}'
        given = uuid.uuid4()
        headers = {
            f"h{uid}": {"Nats-Msg-Id": "producer-42"},
            f"u{uid}": {"Nats-Msg-Id": str(given)},
            f"n{uid}": None,
        }
        seqs = {}
        for build_id, hdrs in headers.items():
            ack = await js.publish(
                subjects.subject(build_id, BuildRequested.kind),
                body % build_id.encode(),
                headers=hdrs,
            )
            seqs[build_id] = ack.seq

        deadline = asyncio.get_running_loop().time() + 20
        while not all(len(ids) == len(headers) for ids in seen.values()):
            assert asyncio.get_running_loop().time() < deadline, seen
            await asyncio.sleep(0.05)

        assert seen["agent"] == seen["budget"]
        ids = seen["agent"]
        assert ids[f"h{uid}"] == stable_id("nats-msg-id", "producer-42")
        assert ids[f"u{uid}"] == given
        assert ids[f"n{uid}"] == stable_id("stream-seq", subjects.STREAM, seqs[f"n{uid}"])
    finally:
        await producer.close()
        for bus in buses.values():
            await bus.stop(0)


async def test_services_wait_for_the_set_up_step_on_a_cluster(tmp_path):
    cluster = NatsCluster(tmp_path, tmp_path / "logs", size=3)
    url = cluster.start()
    try:
        settings = CommonSettings(nats_url=url, stream_replicas=3)
        bus = Bus(settings, "agent")
        refusal: StreamsMissing | None = None
        deadline = asyncio.get_running_loop().time() + 60
        while refusal is None:  # a new cluster answers once it has elected its meta leader
            assert asyncio.get_running_loop().time() < deadline, "JetStream never answered"
            try:
                await bus.connect()
            except StreamsMissing as err:
                refusal = err
            except TimeoutError:
                continue
        assert "set-up step" in str(refusal)

        await set_up(settings)
        await bus.connect()
        try:
            js = bus.nc.jetstream()
            for name in (subjects.STREAM, subjects.DLQ_STREAM, f"KV_{subjects.BUDGET_GATES}"):
                info = await js.stream_info(name)
                assert info.config.num_replicas == 3, name
                assert info.cluster is not None and len(info.cluster.replicas or []) == 2
            await bus.gates()
        finally:
            await bus.stop(0)
    finally:
        cluster.stop()
