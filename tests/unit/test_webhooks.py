"""The webhooks service's pure parts: Standard Webhooks signatures (checked by the
``standardwebhooks`` package), refused targets, the retry schedule, the delivery body."""

from __future__ import annotations

import ipaddress
import json
import time
import uuid

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from kiln_contracts import BuildCompleted, BuildRequested, ToolCall
from kiln_contracts.webhooks import EVENT_TYPES, WebhookPayload
from kiln_webhooks import deliveries, signing, targets
from kiln_webhooks.settings import WebhooksSettings


def test_a_signature_verifies_with_the_standardwebhooks_package() -> None:
    secret = signing.new_secret()
    assert secret.startswith("whsec_")
    body = b'{"type":"build.completed"}'
    headers = signing.headers([secret], "msg_" + "a" * 32, int(time.time()), body)
    assert Webhook(secret).verify(body, headers) == {"type": "build.completed"}
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)


def test_while_a_rotated_secret_overlaps_both_secrets_verify() -> None:
    old, new = signing.new_secret(), signing.new_secret()
    body = b"{}"
    headers = signing.headers([new, old], "msg_" + "b" * 32, int(time.time()), body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(body, headers)
    Webhook(new).verify(body, headers)


def test_a_stale_timestamp_does_not_verify() -> None:
    secret = signing.new_secret()
    headers = signing.headers([secret], "msg_" + "c" * 32, int(time.time()) - 3600, b"{}")
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(b"{}", headers)


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.9", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.10.1", "link-local"),
        ("fe80::1", "link-local"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "globally routable"),
        ("::ffff:127.0.0.1", "loopback"),
    ],
)
def test_each_refused_class_of_address(address: str, why: str) -> None:
    reason = targets.refusal(ipaddress.ip_address(address))
    assert reason is not None and why in reason


def test_a_public_address_and_an_allowed_network_are_accepted() -> None:
    assert targets.refusal(ipaddress.ip_address("93.184.216.34")) is None
    allowed = targets.networks("127.0.0.1/32, 10.0.0.0/8")
    assert targets.refusal(ipaddress.ip_address("127.0.0.1"), allowed) is None
    assert targets.refusal(ipaddress.ip_address("10.9.9.9"), allowed) is None
    assert targets.refusal(ipaddress.ip_address("127.0.0.2"), allowed) is not None


@pytest.mark.parametrize(
    ("url", "allow_http", "message"),
    [
        ("ftp://example.com/x", True, "scheme"),
        ("http://example.com/x", False, "scheme"),
        ("https://user:pw@example.com/", False, "credentials"),
        ("https:///nohost", False, "no host"),
        ("https://localhost:8080/", False, "refused"),
        ("https://metadata.google.internal/", False, "refused"),
        ("https://app.localhost/", False, "refused"),
        ("https://example.com:99999/", False, "valid URL"),
    ],
)
def test_malformed_or_local_urls_are_refused(url: str, allow_http: bool, message: str) -> None:
    with pytest.raises(targets.UnsafeTarget, match=message):
        targets.parse(url, allow_http=allow_http)


async def test_an_address_literal_is_checked_without_dns() -> None:
    with pytest.raises(targets.UnsafeTarget, match="loopback"):
        await targets.check_url("https://127.0.0.1:9/", allowed=(), allow_http=False, timeout_s=1)
    with pytest.raises(targets.UnsafeTarget, match="metadata"):
        await targets.check_url("http://[fd00:ec2::254]/", allowed=(), allow_http=True, timeout_s=1)
    target = await targets.check_url(
        "http://127.0.0.1:9/hook",
        allowed=targets.networks("127.0.0.1/32"),
        allow_http=True,
        timeout_s=1,
    )
    assert (target.host, target.port) == ("127.0.0.1", 9)


def test_retries_follow_the_schedule_with_jitter_then_stop() -> None:
    schedule = WebhooksSettings().retry_schedule()
    assert len(schedule) == 7
    assert 86_400 < sum(schedule) < 2 * 86_400  # about a day
    for attempts, base in enumerate(schedule, start=1):
        low = deliveries.retry_delay(schedule, attempts, lambda: 0.0)
        high = deliveries.retry_delay(schedule, attempts, lambda: 1.0)
        assert low == pytest.approx(base * 0.8) and high == pytest.approx(base * 1.2)
    assert deliveries.retry_delay(schedule, len(schedule) + 1, lambda: 0.5) is None


def test_the_body_is_the_documented_payload() -> None:
    event = BuildCompleted(
        build_id="b1", user_id="u1", summary="done", iterations=3, cost_micro_usd=10
    )
    body = json.loads(deliveries.payload(event, 42))
    parsed = WebhookPayload.model_validate(body)
    assert parsed.type == "build.completed"
    assert parsed.data.sequence == 42 and parsed.data.event_id == event.event_id
    assert parsed.data.message["summary"] == "done"


class FakeStore:
    def __init__(self) -> None:
        self.queued: set[tuple[str, str]] = set()

    async def enqueue(self, user_id, build_id, event_type, event_id, seq, body) -> int:  # type: ignore[no-untyped-def]
        key = (event_type, event_id)
        if key in self.queued:
            return 0
        self.queued.add(key)
        return 1


async def test_an_event_is_queued_once_and_other_kinds_not_at_all() -> None:
    store = FakeStore()
    event = BuildRequested(
        build_id="b2", user_id="u2", tier="pro", idea_brief="x", understanding_qna=[]
    )
    assert await deliveries.accept(store, event, 1) == 1  # type: ignore[arg-type]
    assert await deliveries.accept(store, event, 1) == 0  # type: ignore[arg-type]
    call = ToolCall(
        build_id="b2", user_id="u2", call_id=uuid.uuid4().hex, iteration=1, tool="bash", input={}
    )
    assert await deliveries.accept(store, call, 2) == 0  # type: ignore[arg-type]
    assert "build.started" in EVENT_TYPES


def test_settings_refuse_a_lease_shorter_than_an_attempt_and_a_bad_schedule() -> None:
    with pytest.raises(ValueError, match="LEASE"):
        WebhooksSettings(webhooks_lease_s=10, webhooks_response_timeout_s=15)
    with pytest.raises(ValueError):
        WebhooksSettings(webhooks_retry_schedule_s="5,soon")
    assert WebhooksSettings(webhooks_retry_schedule_s="0.5, 1,2").retry_schedule() == [0.5, 1, 2]
