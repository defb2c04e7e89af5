"""The dispatcher's attempt with fakes: what it signs, and what it tells the store after a
success, a failure with retries left, the last failure and a refused target."""

from __future__ import annotations

from typing import Any

from standardwebhooks.webhooks import Webhook

from kiln_webhooks import signing
from kiln_webhooks.deliveries import Dispatcher
from kiln_webhooks.ports import AttemptResult, Claimed, Outcome


class FakeSender:
    def __init__(self, result: AttemptResult) -> None:
        self.result = result
        self.sent: list[tuple[str, dict[str, str], bytes]] = []

    async def send(self, url: str, headers: dict[str, str], body: bytes) -> AttemptResult:
        self.sent.append((url, headers, body))
        return self.result


class FakeStore:
    def __init__(self, disables: str | None = None) -> None:
        self.recorded: list[tuple[Claimed, Outcome]] = []
        self.disables = disables

    async def record(self, claimed: Claimed, outcome: Outcome) -> str | None:
        self.recorded.append((claimed, outcome))
        return self.disables


def claimed(attempts: int, secrets: list[str]) -> Claimed:
    return Claimed(
        delivery_id="msg_" + "d" * 32,
        endpoint_id="wh_" + "e" * 32,
        build_id="b1",
        event_type="build.completed",
        attempts=attempts,
        body=b'{"type":"build.completed"}',
        url="https://example.com/hook",
        secrets=secrets,
        token="t",
    )


def dispatcher(store: Any, sender: Any) -> Dispatcher:
    return Dispatcher(store, sender, [1.0, 10.0], disable_after_s=99.0, rand=lambda: 0.5)


async def test_a_success_is_recorded_and_signed_with_every_secret_in_use() -> None:
    old, new = signing.new_secret(), signing.new_secret()
    store, sender = FakeStore(), FakeSender(AttemptResult(True, 204, None, 0.01))
    await dispatcher(store, sender).attempt(claimed(1, [new, old]))
    ((_, headers, body),) = sender.sent
    assert headers["webhook-id"] == "msg_" + "d" * 32
    Webhook(old).verify(body, headers)
    Webhook(new).verify(body, headers)
    ((_, outcome),) = store.recorded
    assert outcome.ok and outcome.status_code == 204 and outcome.retry_in_s is None


async def test_failures_are_retried_by_the_schedule_then_given_up() -> None:
    fail = AttemptResult(False, 500, "HTTP 500", 0.01)
    store = FakeStore()
    d = dispatcher(store, FakeSender(fail))
    for attempts in (1, 2, 3):
        await d.attempt(claimed(attempts, [signing.new_secret()]))
    delays = [o.retry_in_s for _, o in store.recorded]
    assert delays == [1.0, 10.0, None]  # the last failure: no retry left
    assert all(not o.ok and o.disable_after_s == 99.0 for _, o in store.recorded)


async def test_a_refused_target_is_a_failure_like_any_other() -> None:
    refused = AttemptResult(
        False, None, "refused target: x is a private address", 0.0, refused=True
    )
    store = FakeStore(disables="every delivery has failed since ...")
    await dispatcher(store, FakeSender(refused)).attempt(claimed(1, [signing.new_secret()]))
    ((_, outcome),) = store.recorded
    assert outcome.error and "refused" in outcome.error and outcome.retry_in_s == 1.0
