"""Webhooks, as a user and their receivers see them: every service a process, a build posted
over HTTP, its events delivered to local receivers that verify the Standard Webhooks signatures
with the ``standardwebhooks`` package — each event once per webhook-id, in the build's order;
a receiver that fails three times gets it on the fourth attempt; the webhooks service SIGKILLed
in the middle of a delivery loses nothing; unsafe targets, bad input and other users' endpoints
are refused."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from kiln_contracts.webhooks import TYPE_OF_KIND
from kiln_devstack.stack import DEV_API_KEY, Stack
from tests.e2e.stacks import own_stack
from tests.e2e.test_build_end_to_end import BRIEF, stream_history

pytestmark = pytest.mark.e2e

ADMIN = "kiln-webhooks-e2e-admin"
ALL_TYPES = sorted(set(TYPE_OF_KIND.values()))


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int


@dataclass
class Receiver:
    """A local HTTP receiver. Paths: ``/ok`` answers 204; ``/fail3`` answers 500 to the first
    three requests of each webhook-id, then 200; ``/hold`` keeps its first request unanswered
    until ``release`` is set; ``/down`` always answers 503."""

    received: list[Received] = field(default_factory=list)
    holding: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def start(self) -> str:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                path = self.path
                with receiver.lock:
                    seen = sum(
                        1
                        for r in receiver.received
                        if r.path == path and r.headers["webhook-id"] == headers["webhook-id"]
                    )
                if path == "/hold" and not receiver.holding.is_set():
                    receiver.holding.set()
                    receiver.release.wait(60)
                    return  # the sender is gone by now: never answered
                code = {"/ok": 204, "/down": 503}.get(path, 200)
                if path == "/fail3" and seen < 3:
                    code = 500
                with receiver.lock:
                    receiver.received.append(Received(path, headers, body, code))
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]


@pytest.fixture(scope="module")
def stack(infra: dict[str, str]) -> Iterator[Stack]:
    def env(data_dir: Path) -> dict[str, str]:
        return {
            "KILN_ADMIN_API_KEY": ADMIN,
            # fast retries, a short lease (a killed attempt is retried soon), quick polling;
            # an endpoint failing for 6 s is disabled
            "KILN_WEBHOOKS_RETRY_SCHEDULE_S": "0.3,0.3,0.3,1,1,2,2,2",
            "KILN_WEBHOOKS_POLL_S": "0.2",
            "KILN_WEBHOOKS_LEASE_S": "4",
            "KILN_WEBHOOKS_CONNECT_TIMEOUT_S": "1",
            "KILN_WEBHOOKS_RESPONSE_TIMEOUT_S": "2",
            "KILN_WEBHOOKS_DISABLE_AFTER_S": "6",
            "KILN_WEBHOOKS_ALLOWED_NETWORKS": "127.0.0.1/32",
            "KILN_SCRIPTED_LATENCY_S": "0.2",
        }

    with own_stack(infra, "hooks", env) as s:
        # the gateway is ready; the webhooks service may still be applying its migrations
        with client(s) as c:
            wait_until("the webhooks service", lambda: c.get("/v1/webhooks").status_code == 200, s)
        yield s


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, str]]:
    r = Receiver()
    url = r.start()
    try:
        yield r, url
    finally:
        r.stop()


def client(stack: Stack, key: str = DEV_API_KEY) -> httpx.Client:
    return httpx.Client(
        base_url=stack.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


def other_user_key(stack: Stack) -> str:
    with client(stack, ADMIN) as admin:
        created = admin.post("/v1/admin/keys", json={"user_id": "hooks-other", "tier": "pro"})
        assert created.status_code == 201, created.text
        return str(created.json()["api_key"])


def register(c: httpx.Client, url: str, types: list[str] | None = None) -> tuple[str, str]:
    body: dict[str, Any] = {"url": url}
    if types is not None:
        body["event_types"] = types
    created = c.post("/v1/webhooks", json=body)
    assert created.status_code == 201, created.text
    out = created.json()
    assert out["secret"].startswith("whsec_")
    assert "secret" not in c.get(f"/v1/webhooks/{out['endpoint']['id']}").json()
    return out["endpoint"]["id"], out["secret"]


def wait_until(what: str, check: Any, stack: Stack, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        stack.check_alive()
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def first_receipts(received: list[Received], secret: str) -> list[dict[str, Any]]:
    """The payload of each webhook-id at its first successful receipt, in arrival order; every
    receipt's signature verified, and every receipt of one webhook-id the same body."""
    verify = Webhook(secret)
    bodies: dict[str, bytes] = {}
    out = []
    for r in received:
        payload = verify.verify(r.body, r.headers)
        wid = r.headers["webhook-id"]
        assert bodies.setdefault(wid, r.body) == r.body, f"{wid} came with another body"
        if r.answered < 300 and wid not in {p["_id"] for p in out}:
            out.append({**payload, "_id": wid})
    return out


def expected_events(stack: Stack, build_id: str, types: set[str]) -> list[str]:
    """The event ids of the build's events of ``types``, in stream order."""
    history = asyncio.run(stream_history(stack.env["NATS_URL"], build_id))
    out = []
    for subject, data, _ in history:
        kind = subject.rsplit(".", 1)[-1]
        if TYPE_OF_KIND.get(kind) in types:
            out.append(json.loads(data)["event_id"])
    return out


def test_refused_targets_and_bad_input(stack: Stack) -> None:
    with client(stack) as c:
        refused = {
            "loopback": "http://127.0.0.2:9/x",
            "loopback (IPv6)": "http://[::1]:9/x",
            "private": "http://10.1.2.3/x",
            "private (192.168)": "http://192.168.0.1/x",
            "link-local": "http://169.254.10.10/x",
            "metadata": "http://169.254.169.254/latest/meta-data/",
            "metadata (IPv6)": "http://[fd00:ec2::254]/",
            "metadata by name": "http://metadata.google.internal/",
            "localhost by name": "http://localhost:8080/",
            "unspecified": "http://0.0.0.0/",
            "not a URL scheme": "ftp://example.com/x",
        }
        for name, url in refused.items():
            answer = c.post("/v1/webhooks", json={"url": url})
            assert answer.status_code == 422, (name, answer.text)
            assert answer.headers["content-type"].startswith("application/problem+json")
        bad = [
            {"url": "http://127.0.0.1:9/x", "event_types": ["build.exploded"]},
            {"url": "http://127.0.0.1:9/x", "surprise": 1},
            {"event_types": ["build.completed"]},
            {"url": "http://127.0.0.1:9/x", "description": "x" * 501},
        ]
        for body in bad:
            assert c.post("/v1/webhooks", json=body).status_code == 422, body
        assert c.get("/v1/webhooks/wh_nope").status_code == 404
        assert c.get("/v1/webhooks/" + "x" * 101).status_code == 422
        assert c.get("/v1/webhooks", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client(stack, "nope").get("/v1/webhooks").status_code == 401


def test_endpoints_are_their_owners_alone(stack: Stack, receiver: tuple[Receiver, str]) -> None:
    _, url = receiver
    with client(stack) as mine, client(stack, other_user_key(stack)) as theirs:
        endpoint_id, _ = register(mine, f"{url}/ok", ["build.completed"])
        assert theirs.get(f"/v1/webhooks/{endpoint_id}").status_code == 404
        assert (
            theirs.patch(f"/v1/webhooks/{endpoint_id}", json={"enabled": False}).status_code == 404
        )
        assert theirs.delete(f"/v1/webhooks/{endpoint_id}").status_code == 404
        assert theirs.post(f"/v1/webhooks/{endpoint_id}/rotate-secret").status_code == 404
        assert theirs.get(f"/v1/webhooks/{endpoint_id}/deliveries").status_code == 404
        assert endpoint_id not in {w["id"] for w in theirs.get("/v1/webhooks").json()["webhooks"]}
        # the owner can change it, and unsafe URLs stay refused on update
        patched = mine.patch(f"/v1/webhooks/{endpoint_id}", json={"description": "mine"})
        assert patched.status_code == 200 and patched.json()["description"] == "mine"
        unsafe = mine.patch(f"/v1/webhooks/{endpoint_id}", json={"url": "http://10.0.0.1/"})
        assert unsafe.status_code == 422
        assert mine.delete(f"/v1/webhooks/{endpoint_id}").status_code == 204
        assert mine.get(f"/v1/webhooks/{endpoint_id}").status_code == 404


def test_a_build_s_events_reach_every_endpoint_signed_once_each_and_in_order(
    stack: Stack, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    with client(stack) as c:
        everything, secret_all = register(c, f"{url}/ok", ALL_TYPES)
        flaky, secret_flaky = register(c, f"{url}/fail3", ["build.started", "build.completed"])
        held, secret_held = register(c, f"{url}/hold", ALL_TYPES)
        down, _ = register(c, f"{url}/down", ["build.started", "build.iteration"])

        build = c.post("/v1/builds", json={"idea_brief": BRIEF})
        assert build.status_code in (200, 201, 202), build.text
        build_id = build.json()["build_id"]

        # The first delivery to /hold is under way (never answered): kill the service now.
        assert rec.holding.wait(60), "no delivery reached /hold"
        stack.kill("webhooks")
        rec.release.set()
        stack.start_service("webhooks")

        wait_until(
            "the build to end",
            lambda: c.get(f"/v1/builds/{build_id}").json().get("status") == "completed",
            stack,
            240,
        )
        # the build's app (the scripted build serves a page) stops after the end, with its
        # sandbox: its preview.gone is the build's last event of a webhook type
        wait_until(
            "the build's preview gone",
            lambda: expected_events(stack, build_id, {"preview.gone"}),
            stack,
            120,
        )
        all_types = set(ALL_TYPES)
        expected = expected_events(stack, build_id, all_types)
        assert len(expected) >= 4  # started, iterations, completed

        def arrived(path: str, secret: str, n: int) -> list[dict[str, Any]] | None:
            got = [
                p for p in first_receipts(rec.at(path), secret) if p["data"]["build_id"] == build_id
            ]
            return got if len(got) >= n else None

        for path, secret in (("/ok", secret_all), ("/hold", secret_held)):
            got = wait_until(
                f"every event at {path}",
                lambda p=path, s=secret: arrived(p, s, len(expected)),
                stack,
            )
            assert [p["data"]["event_id"] for p in got] == expected, path  # once each, in order
            # (an id may come twice: the service was killed between an answer and its record,
            # so that attempt is made again; first_receipts checks it is the same delivery)
            seqs = [p["data"]["sequence"] for p in got]
            assert seqs == sorted(seqs)
            assert got[0]["type"] == "build.started" and got[-1]["type"] == "preview.gone"
            assert [p["type"] for p in got].count("build.completed") == 1

        # /fail3: each event on its fourth attempt, the same webhook-id every time
        flaky_expected = expected_events(stack, build_id, {"build.started", "build.completed"})
        got = wait_until("/fail3's deliveries", lambda: arrived("/fail3", secret_flaky, 2), stack)
        assert [p["data"]["event_id"] for p in got] == flaky_expected
        for p in got:
            tries = [r for r in rec.at("/fail3") if r.headers["webhook-id"] == p["_id"]]
            assert [r.answered for r in tries] == [500, 500, 500, 200]
        log = c.get(f"/v1/webhooks/{flaky}/deliveries").json()["deliveries"]
        mine = [d for d in log if d["build_id"] == build_id]
        assert len(mine) == 2
        assert all(d["status"] == "delivered" for d in mine), mine
        # the kill may have cost build.started an attempt the receiver never saw; not the end
        completed = next(d for d in mine if d["event_type"] == "build.completed")
        assert completed["attempts"] == 4 and all(d["attempts"] >= 4 for d in mine), mine
        assert all(d["last_status_code"] == 200 for d in mine)

        # the delivery killed mid-attempt was tried again with its webhook-id
        held_log = c.get(f"/v1/webhooks/{held}/deliveries?limit=200").json()["deliveries"]
        assert all(d["status"] == "delivered" for d in held_log if d["build_id"] == build_id)
        assert max(d["attempts"] for d in held_log) >= 2

        # manual redelivery: the same webhook-id again, the log counts the attempt
        first = next(d for d in log if d["build_id"] == build_id)
        again = c.post(f"/v1/webhooks/{flaky}/deliveries/{first['id']}/redeliver")
        assert again.status_code == 202, again.text
        wait_until(
            "the redelivery",
            lambda: (
                len([r for r in rec.at("/fail3") if r.headers["webhook-id"] == first["id"]]) == 5
            ),
            stack,
        )
        assert (
            c.post(f"/v1/webhooks/{flaky}/deliveries/msg_{'0' * 32}/redeliver").status_code == 404
        )

        # an endpoint that always fails is disabled, with the reason, and says so
        def disabled() -> dict[str, Any] | None:
            body = c.get(f"/v1/webhooks/{down}").json()
            return body if not body["enabled"] else None

        gone = wait_until("/down to be disabled", disabled, stack, 90)
        assert "failed since" in gone["disabled_reason"]
        down_log = c.get(f"/v1/webhooks/{down}/deliveries").json()["deliveries"]
        assert down_log and all(d["last_status_code"] == 503 for d in down_log if d["attempts"])
        enabled = c.patch(f"/v1/webhooks/{down}", json={"enabled": True}).json()
        assert enabled["enabled"] and enabled["disabled_reason"] is None

        # a rotated secret: both old and new verify during the overlap
        rotated = c.post(f"/v1/webhooks/{everything}/rotate-secret", json={"overlap_s": 600})
        assert rotated.status_code == 200
        new_secret = rotated.json()["secret"]
        assert new_secret != secret_all and rotated.json()["endpoint"]["previous_secret_expires_at"]
        before = len(rec.at("/ok"))
        some = next(d for d in c.get(f"/v1/webhooks/{everything}/deliveries").json()["deliveries"])
        assert (
            c.post(f"/v1/webhooks/{everything}/deliveries/{some['id']}/redeliver").status_code
            == 202
        )
        wait_until("the re-signed delivery", lambda: len(rec.at("/ok")) > before, stack)
        last = rec.at("/ok")[-1]
        Webhook(new_secret).verify(last.body, last.headers)
        Webhook(secret_all).verify(last.body, last.headers)

    metrics = httpx.get(stack.metrics_url("webhooks"), timeout=5).text
    assert 'kiln_webhook_attempts_total{outcome="delivered"}' in metrics
    assert 'kiln_webhook_attempts_total{outcome="retry"}' in metrics
    assert "kiln_webhook_backlog" in metrics
