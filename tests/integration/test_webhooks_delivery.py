"""The webhooks service's store and sender on a real Postgres and real HTTP: order per build,
a lease that outlives a dead attempt, retries to the end, auto-disable, and targets refused at
the connection (not only at registration), redirects not followed, slow receivers timed out."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from kiln_contracts import BuildCompleted, BuildRequested, BuildSleeping
from kiln_webhooks import deliveries, signing, targets
from kiln_webhooks.adapters.http import HttpSender
from kiln_webhooks.adapters.postgres import PgStore
from kiln_webhooks.deliveries import Dispatcher
from kiln_webhooks.ports import Outcome

pytestmark = pytest.mark.integration

LOOPBACK = targets.networks("127.0.0.1/32")


class Receiver:
    """Answers each path as told: ``/ok`` 200, ``/fail`` 500, ``/redirect`` 302 to the metadata
    address, ``/slow`` after 3 s, ``/big`` 200 with a 1 MB body."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                receiver.seen.append(
                    (self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                if self.path == "/slow":
                    time.sleep(3)
                code = {"/fail": 500, "/redirect": 302}.get(self.path, 200)
                payload = b"x" * (1024 * 1024) if self.path == "/big" else b"ok"
                self.send_response(code)
                if code == 302:
                    self.send_header("location", "http://169.254.169.254/latest/meta-data/")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def at(self, path: str) -> list[tuple[str, dict[str, str], bytes]]:
        return [s for s in self.seen if s[0] == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture
async def store(infra: dict[str, str], uid: str) -> AsyncIterator[PgStore]:
    s = PgStore(infra["DATABASE_URL"], f"webhooks_{uid}")
    await s.open()
    yield s
    await s.pool.execute(f'DROP SCHEMA "webhooks_{uid}" CASCADE')
    await s.close()


@pytest.fixture
async def sender() -> AsyncIterator[HttpSender]:
    s = HttpSender(
        allowed=LOOPBACK,
        allow_http=True,
        connect_timeout_s=1,
        response_timeout_s=1,
        max_response_bytes=1024,
    )
    await s.open()
    yield s
    await s.close()


async def endpoint(store: PgStore, user: str, url: str, types: list[str]) -> tuple[str, str]:
    secret = signing.new_secret()
    ep = await store.create_endpoint(f"wh_{uuid.uuid4().hex}", user, url, types, "", secret)
    return ep.id, secret


async def until(check: Any, timeout: float = 20) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if got := await check():
            return got
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def test_one_build_s_events_go_in_order_across_dispatchers(
    store: PgStore, sender: HttpSender, receiver: Receiver, uid: str
) -> None:
    user, build = f"u{uid}", f"b{uid}"
    _, secret = await endpoint(
        store,
        user,
        f"{receiver.url}/ok?{uid}",
        ["build.started", "build.sleeping", "build.completed"],
    )
    events = [
        BuildRequested(
            build_id=build, user_id=user, tier="pro", idea_brief="x", understanding_qna=[]
        ),
        *[BuildSleeping(build_id=build, user_id=user, reason=f"r{i}") for i in range(6)],
        BuildCompleted(build_id=build, user_id=user, summary="s", iterations=1, cost_micro_usd=0),
    ]
    for seq, event in enumerate(events, start=10):
        assert await deliveries.accept(store, event, seq) == 1
        assert await deliveries.accept(store, event, seq) == 0  # a redelivered event: once
    # Three dispatchers (three replicas) at once: still one at a time per build, in order.
    dispatchers = [
        Dispatcher(store, sender, [0.1], disable_after_s=3600, concurrency=4, poll_s=0.05)
        for _ in range(3)
    ]
    for d in dispatchers:
        d.start()
    try:

        async def all_arrived() -> bool:
            return len(receiver.at(f"/ok?{uid}")) >= len(events)

        await until(all_arrived)
    finally:
        for d in dispatchers:
            await d.stop()
    got = [s for s in receiver.seen if s[0] == f"/ok?{uid}"]
    payloads = [Webhook(secret).verify(body, headers) for _, headers, body in got]
    assert [p["data"]["event_id"] for p in payloads] == [str(e.event_id) for e in events]
    assert len({h["webhook-id"] for _, h, _ in got}) == len(events)


async def test_a_dead_attempt_is_retried_after_its_lease_with_the_same_id(
    store: PgStore, sender: HttpSender, receiver: Receiver, uid: str
) -> None:
    user, build = f"u{uid}", f"b{uid}"
    await endpoint(store, user, f"{receiver.url}/ok?lease{uid}", ["build.completed"])
    event = BuildCompleted(
        build_id=build, user_id=user, summary="s", iterations=1, cost_micro_usd=0
    )
    await deliveries.accept(store, event, 1)
    (claimed,) = await store.claim(10, lease_s=0.5)  # a replica that then dies
    assert await store.claim(10, lease_s=0.5) == []  # leased: nobody else takes it
    again = await until(lambda: store.claim(10, lease_s=30))
    assert again[0].delivery_id == claimed.delivery_id and again[0].attempts == 2
    # The dead replica's late answer does not overwrite the live attempt's lease.
    assert await store.record(claimed, Outcome(True, 200, None, None)) is None
    row = await store.pool.fetchrow("SELECT status, lease_token FROM deliveries")
    assert row["status"] == "pending" and row["lease_token"] == again[0].token


async def test_retries_run_out_then_the_endpoint_is_disabled_with_a_reason(
    store: PgStore, sender: HttpSender, receiver: Receiver, uid: str
) -> None:
    user = f"u{uid}"
    endpoint_id, _ = await endpoint(store, user, f"{receiver.url}/fail", ["build.completed"])
    d = Dispatcher(store, sender, [0.05, 0.05], disable_after_s=0.3, poll_s=0.05)
    d.start()
    try:
        for i in range(20):
            event = BuildCompleted(
                build_id=f"b{uid}{i}", user_id=user, summary="s", iterations=1, cost_micro_usd=0
            )
            await deliveries.accept(store, event, i + 1)
            ep = await store.endpoint(user, endpoint_id)
            assert ep is not None
            if not ep.enabled:
                break
            await asyncio.sleep(0.1)
        ep = await until(lambda: _disabled(store, user, endpoint_id))
    finally:
        await d.stop()
    assert ep.disabled_reason and "HTTP 500" in ep.disabled_reason
    log = await store.deliveries(user, endpoint_id, "failed", 50, None)
    assert log and log[-1].attempts == 3 and log[-1].last_status_code == 500


async def _disabled(store: PgStore, user: str, endpoint_id: str) -> Any:
    ep = await store.endpoint(user, endpoint_id)
    return ep if ep is not None and not ep.enabled else None


async def test_redirects_are_not_followed_and_slow_or_big_answers_are_bounded(
    sender: HttpSender, receiver: Receiver
) -> None:
    redirected = await sender.send(f"{receiver.url}/redirect", {}, b"{}")
    assert not redirected.ok and redirected.status_code == 302
    assert "not followed" in (redirected.error or "")
    slow = await sender.send(f"{receiver.url}/slow", {}, b"{}")
    assert not slow.ok and slow.error == "timed out"
    big = await sender.send(f"{receiver.url}/big", {}, b"{}")
    assert big.ok and big.status_code == 200


async def test_targets_are_checked_again_at_each_connection(receiver: Receiver) -> None:
    # Registered while 127.0.0.1 was allowed; now it is not (as if DNS had changed): refused
    # before anything is sent.
    strict = HttpSender(
        allowed=(),
        allow_http=True,
        connect_timeout_s=1,
        response_timeout_s=1,
        max_response_bytes=64,
    )
    await strict.open()
    try:
        before = len(receiver.seen)
        result = await strict.send(f"{receiver.url}/ok", {}, b"{}")
        assert result.refused and "loopback" in (result.error or "")
        # A host name is resolved by the connector and refused there too.
        name = socket.gethostname()
        try:
            address = ipaddress.ip_address(socket.gethostbyname(name))
        except OSError:
            address = None
        if address is not None and targets.refusal(address) is not None:
            port = receiver.server.server_address[1]
            by_name = await strict.send(f"http://{name}:{port}/ok", {}, b"{}")
            assert by_name.refused and "refused target" in (by_name.error or ""), by_name
        assert len(receiver.seen) == before
    finally:
        await strict.close()
