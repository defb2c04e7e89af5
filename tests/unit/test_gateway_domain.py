"""The gateway's domain with fakes: creating builds, the projection, the SSE stream."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime
from typing import Any, Literal

import pytest

from kiln_contracts import (
    BudgetGate,
    BuildCancelled,
    BuildCompleted,
    BuildContinued,
    BuildRejected,
    BuildRequested,
    BuildResumed,
    BuildSleeping,
    Envelope,
    IterationCompleted,
    ProcessExited,
    ProcessStarted,
    QnA,
    SendUserMessage,
    SnapshotSaved,
    TopUpRequested,
    Usage,
    stable_id,
)
from kiln_gateway import builds, history, messages, projection
from kiln_gateway.model import Build, Caller, Message, NewBuild, NewMessage, Projection
from kiln_gateway.ports import Inserted, MessageInserted, StoredEvent
from kiln_gateway.schemas_builds import BuildOut
from kiln_runtime.errors import RetryLater


class FakeStore:
    def __init__(self) -> None:
        self.rows: dict[str, Build] = {}
        self.messages: list[Message] = []

    async def insert_message(self, new: NewMessage, *, cap: int) -> MessageInserted:
        mine = [m for m in self.messages if m.build_id == new.build_id]
        for m in mine:
            if new.idempotency_key and m.idempotency_key == new.idempotency_key:
                return MessageInserted("existing", m)
        if self.rows[new.build_id].state.terminal:
            active = [
                b for b in self.rows.values() if b.user_id == new.user_id and not b.state.terminal
            ]
            if len(active) >= cap:
                return MessageInserted("capped", None)
        message = Message(
            **dataclasses.asdict(new), seq=len(mine) + 1, created_at=datetime.now(UTC)
        )
        self.messages.append(message)
        return MessageInserted("created", message)

    async def unpublished_messages(
        self, build_id: str | None = None, older_than_s: float = 0.0, limit: int = 100
    ) -> list[Message]:
        return sorted(
            (m for m in self.messages
             if m.published_at is None and build_id in (None, m.build_id)),
            key=lambda m: (m.build_id, m.seq),
        )  # fmt: skip

    async def mark_message_published(self, message_id: str) -> None:
        self.messages = [
            dataclasses.replace(m, published_at=m.created_at) if m.message_id == message_id else m
            for m in self.messages
        ]

    async def insert_build(self, new: NewBuild, *, cap: int) -> Inserted:
        for b in self.rows.values():
            if new.idempotency_key and (b.user_id, b.idempotency_key) == (
                new.user_id,
                new.idempotency_key,
            ):
                return Inserted("existing", b)
        active = [
            b for b in self.rows.values() if b.user_id == new.user_id and not b.state.terminal
        ]
        if len(active) >= cap:
            return Inserted("capped", None)
        now = datetime.now(UTC)
        build = Build(**dataclasses.asdict(new), created_at=now, updated_at=now)
        self.rows[new.build_id] = build
        return Inserted("created", build)

    async def mark_published(self, build_id: str) -> None:
        b = self.rows[build_id]
        self.rows[build_id] = dataclasses.replace(b, published_at=b.created_at)

    async def unpublished(self, older_than_s: float, limit: int = 100) -> list[Build]:
        return [b for b in self.rows.values() if b.published_at is None]

    async def insert_from_event(self, event: BuildRequested) -> None:
        if event.build_id not in self.rows:
            self.rows[event.build_id] = Build(
                build_id=event.build_id,
                user_id=event.user_id,
                tier=event.tier,
                idea_brief=event.idea_brief,
                understanding_qna=[],
                limits={},
                created_at=event.occurred_at,
                updated_at=event.occurred_at,
            )

    async def update_projection(
        self, build_id: str, seq: int, evolve: Callable[[Projection], Projection]
    ) -> Literal["applied", "duplicate", "missing"]:
        b = self.rows.get(build_id)
        if b is None:
            return "missing"
        if seq <= b.state.last_seq:
            return "duplicate"
        self.rows[build_id] = dataclasses.replace(b, state=evolve(b.state))
        return "applied"


class Publisher:
    def __init__(self) -> None:
        self.sent: list[Envelope] = []
        self.fail = False

    async def __call__(self, msg: Envelope) -> None:
        if self.fail:
            raise ConnectionError("down")
        self.sent.append(msg)


ME = Caller("u1", "pro")


async def create(
    store: Any,
    pub: Publisher,
    key: str | None = None,
    brief: str = "b",
    cap: int = 5,
    gate: BudgetGate | None = None,
):
    return await builds.create_build(
        store,
        pub,
        ME,
        idea_brief=brief,
        understanding_qna=[QnA(question="q", answer="a")],
        limits=None,
        idempotency_key=key,
        cap=cap,
        gate=gate,
        now=NOW,
    )


NOW = datetime(2025, 3, 31, 12, tzinfo=UTC)
CLOSED = BudgetGate(
    user_id="u1",
    state="closed",
    until=datetime(2025, 4, 1, tzinfo=UTC),
    reason="daily allowance used up",
    spent_micro_usd=1_200,
    allowance_micro_usd=1_000,
)


async def test_behind_a_closed_gate_nothing_new_is_stored_but_a_retry_finds_its_build():
    store, pub = FakeStore(), Publisher()
    first, _ = await create(store, pub, key="k")
    with pytest.raises(builds.AllowanceUsedUp) as refused:
        await create(store, pub, key="new", gate=CLOSED)
    assert refused.value.gate == CLOSED and "spent 1200 of 1000" in str(refused.value)
    assert len(store.rows) == 1 and len(pub.sent) == 1
    again, created = await create(store, pub, key="k", gate=CLOSED)  # an Idempotency-Key retry
    assert (again.build_id, created) == (first.build_id, False)
    expired = CLOSED.model_copy(update={"until": NOW})  # the reset has passed: open
    _, created = await create(store, pub, key="later", gate=expired)
    assert created and len(store.rows) == 2


async def test_create_publishes_a_stable_build_requested():
    store, pub = FakeStore(), Publisher()
    build, created = await create(store, pub)
    assert created
    (msg,) = pub.sent
    assert isinstance(msg, BuildRequested)
    assert msg.event_id == stable_id(build.build_id, "build_requested")
    assert (msg.user_id, msg.tier, msg.idea_brief) == ("u1", "pro", "b")
    assert msg.understanding_qna == [QnA(question="q", answer="a")]
    assert store.rows[build.build_id].published_at is not None


async def test_idempotency_key_same_build_conflict_on_other_body():
    store, pub = FakeStore(), Publisher()
    first, _ = await create(store, pub, key="k")
    again, created = await create(store, pub, key="k")
    assert (again.build_id, created, len(pub.sent)) == (first.build_id, False, 1)
    with pytest.raises(builds.IdempotencyConflict):
        await create(store, pub, key="k", brief="other")


async def test_cap_and_publish_failure_then_retry_republishes():
    store, pub = FakeStore(), Publisher()
    pub.fail = True
    with pytest.raises(builds.PublishFailed):
        await create(store, pub, key="k", cap=1)
    assert len(store.rows) == 1 and not pub.sent
    with pytest.raises(builds.TooManyBuilds):
        await create(store, pub, key="other", cap=1)
    pub.fail = False
    build, created = await create(store, pub, key="k", cap=1)
    assert not created and [m.build_id for m in pub.sent] == [build.build_id]
    assert await builds.republish_pending(store, pub, 0) == 0


async def test_republish_pending_publishes_unpublished_builds():
    store, pub = FakeStore(), Publisher()
    pub.fail = True
    with pytest.raises(builds.PublishFailed):
        await create(store, pub)
    pub.fail = False
    assert await builds.republish_pending(store, pub, 0) == 1
    assert len(pub.sent) == 1 and await store.unpublished(0) == []


def ev(kind: type[Envelope], **fields: Any) -> Envelope:
    return kind(build_id="b1", user_id="u1", **fields)


def test_evolve_walks_the_lifecycle_and_terminal_sticks():
    s = Projection()
    s = projection.evolve(s, ev(BuildRequested, idea_brief="x"), 1)
    assert s.status == "running"
    it = ev(
        IterationCompleted, iteration=2, model="m", usage=Usage(), stop_reason="x", cost_micro_usd=7
    )
    s = projection.evolve(s, it, 2)
    assert (s.iteration, s.cost_micro_usd) == (2, 7)
    snap = ev(
        SnapshotSaved,
        snapshot_id="s1",
        iteration=2,
        reason="files_changed",
        files=1,
        bytes_total=1,
        bytes_uploaded=1,
    )
    s = projection.evolve(s, snap, 3)
    s = projection.evolve(s, ev(BuildSleeping, reason="budget"), 4)
    assert (s.status, s.last_snapshot_id, s.reason) == ("sleeping", "s1", "budget")
    s = projection.evolve(s, ev(BuildResumed, reason="wake"), 5)
    assert (s.status, s.reason) == ("running", None)
    s = projection.evolve(s, ev(BuildCompleted, summary="done", iterations=3, cost_micro_usd=9), 6)
    assert (s.status, s.summary, s.iteration, s.cost_micro_usd, s.terminal_seq) == (
        "completed",
        "done",
        3,
        9,
        6,
    )
    after = projection.evolve(
        s, ev(BuildCancelled, reason="late", iterations=3, cost_micro_usd=9), 7
    )
    assert (after.status, after.summary, after.last_seq) == ("completed", "done", 7)
    final = snap.model_copy(update={"snapshot_id": "s-final", "reason": "final"})
    after = projection.evolve(after, final, 8)  # the final snapshot is taken after the end
    assert (after.status, after.last_snapshot_id, after.last_seq) == ("completed", "s-final", 8)


def test_the_builds_processes_are_projected_also_after_its_end():
    s = projection.evolve(Projection(), ev(BuildRequested, idea_brief="x"), 1)
    started = ev(
        ProcessStarted,
        process_id="bash_1",
        call_id="toolu_1",
        iteration=1,
        command="python -m http.server 8000",
        sandbox_id="sb-1",
        pid=41,
    )
    s = projection.evolve(s, started, 2)
    s = projection.evolve(s, ev(BuildCompleted, summary="done", iterations=1, cost_micro_usd=1), 3)
    exited = ev(ProcessExited, process_id="bash_1", how="stopped", reason="the build ended")
    s = projection.evolve(s, exited, 4)
    # an exit that comes before its start (another order on the stream) is kept too
    s = projection.evolve(s, ev(ProcessExited, process_id="bash_2", how="lost"), 5)
    s = projection.evolve(s, started.model_copy(update={"process_id": "bash_2", "pid": 42}), 6)
    build = Build(
        build_id="b1", user_id="u1", tier="pro", idea_brief="x", understanding_qna=[], limits={},
        created_at=datetime.now(UTC), updated_at=datetime.now(UTC), state=s,
    )  # fmt: skip
    shown = BuildOut.of(build).model_dump()["processes"]
    assert [(p["process_id"], p["status"], p["pid"]) for p in shown] == [
        ("bash_1", "stopped", 41),
        ("bash_2", "lost", 42),
    ]
    assert shown[0]["command"] == "python -m http.server 8000"
    assert shown[0]["reason"] == "the build ended"
    assert BuildOut.of(build, detail=False).processes == []


def test_a_rejected_build_is_rejected_with_the_reason_for_good():
    s = projection.evolve(Projection(), ev(BuildRequested, idea_brief="x"), 1)
    rejected = ev(
        BuildRejected,
        reason="daily allowance used up: spent 1200 of 1000 micro-USD; ...",
        spent_micro_usd=1_200,
        allowance_micro_usd=1_000,
        resets_at=datetime(2025, 4, 1, tzinfo=UTC),
    )
    s = projection.evolve(s, rejected, 2)
    assert (s.status, s.reason, s.terminal_seq, s.terminal) == (
        "rejected",
        rejected.reason,  # type: ignore[attr-defined]
        2,
        True,
    )
    assert projection.evolve(s, ev(BuildResumed, reason="late wake"), 3).status == "rejected"


async def test_project_is_idempotent_and_waits_for_an_unknown_build():
    store = FakeStore()
    it = ev(
        IterationCompleted, iteration=1, model="m", usage=Usage(), stop_reason="x", cost_micro_usd=5
    )
    with pytest.raises(RetryLater):
        await projection.project(store, it, 2, num_delivered=1)
    assert await projection.project(store, it, 2, num_delivered=3) == "missing"
    assert await projection.project(store, ev(BuildRequested, idea_brief="x"), 1) == "applied"
    assert await projection.project(store, it, 2) == "applied"
    assert await projection.project(store, it, 2) == "duplicate"
    assert store.rows["b1"].state.cost_micro_usd == 5


async def test_a_top_up_is_left_to_the_budget_by_the_projection():
    store = FakeStore()
    outcome = await projection.project(store, TopUpRequested.of("u1", "t1", 5), 7, num_delivered=1)
    assert outcome == "not a build" and store.rows == {}


class FakeHistory:
    def __init__(self, events: list[StoredEvent | None]) -> None:
        self.events = events
        self.after: int | None = None
        self.closed = False

    async def history(
        self, build_id: str, after_seq: int, idle_s: float
    ) -> AsyncGenerator[StoredEvent | None, None]:
        self.after = after_seq
        try:
            for e in self.events:
                if e is None or e.seq > after_seq:
                    yield e
        finally:
            self.closed = True


async def test_event_stream_frames_heartbeats_and_ends_on_terminal():
    src = FakeHistory(
        [
            StoredEvent(3, "agent_narrated", b'{"text":"hi"}'),
            None,
            StoredEvent(4, "build_failed", b'{"a":1}\n{"b":2}'),
            StoredEvent(5, "agent_narrated", b"{}"),
        ]
    )
    now = datetime.now(UTC)
    build = Build("b1", "u1", "pro", "x", [], {}, now, now)
    out = [chunk async for chunk in history.event_stream(src, build, 2, 15)]
    assert out == [
        history.RETRY,
        'id: 3\nevent: agent_narrated\ndata: {"text":"hi"}\n\n',
        ": heartbeat\n\n",
        'id: 4\nevent: build_failed\ndata: {"a":1}\ndata: {"b":2}\n\n',
    ]
    assert src.after == 2 and src.closed
    done = dataclasses.replace(build, state=Projection(status="failed", terminal_seq=4))
    assert [c async for c in history.event_stream(src, done, 4, 15)] == []


# ---------------------------------------------------------------------------- messages


async def send(store: FakeStore, pub: Publisher, build: Build, text: str, key: str | None = None):
    return await messages.send_message(store, pub, ME, build, text=text, idempotency_key=key, cap=1)


async def test_a_message_is_numbered_and_published_once_per_idempotency_key():
    store, pub = FakeStore(), Publisher()
    build, _ = await create(store, pub)
    first, created = await send(store, pub, build, "add tests", key="k1")
    again, created_again = await send(store, pub, build, "add tests", key="k1")
    second, _ = await send(store, pub, build, "and a README")
    assert (created, created_again, again.message_id) == (True, False, first.message_id)
    assert (first.seq, second.seq) == (1, 2)
    sent = [m for m in pub.sent if isinstance(m, SendUserMessage)]
    assert [(m.seq, m.text) for m in sent] == [(1, "add tests"), (2, "and a README")]
    assert sent[0].event_id == stable_id(build.build_id, "user_message", first.message_id)
    with pytest.raises(builds.IdempotencyConflict):
        await send(store, pub, build, "something else", key="k1")


async def test_a_message_stored_while_the_bus_is_down_is_sent_first_next_time():
    store, pub = FakeStore(), Publisher()
    build, _ = await create(store, pub)
    pub.fail = True
    with pytest.raises(messages.MessagePublishFailed):
        await send(store, pub, build, "one")
    pub.fail = False
    await send(store, pub, build, "two")
    assert [m.seq for m in pub.sent if isinstance(m, SendUserMessage)] == [1, 2]
    pub.fail = True
    with pytest.raises(messages.MessagePublishFailed):
        await send(store, pub, build, "three")
    pub.fail = False
    assert await messages.republish_pending_messages(store, pub, 0) == 1
    assert await store.unpublished_messages() == []


async def test_continuing_an_ended_build_counts_towards_the_cap():
    store, pub = FakeStore(), Publisher()
    ended, _ = await create(store, pub, key="a")
    store.rows[ended.build_id] = dataclasses.replace(ended, state=Projection(status="completed"))
    other, _ = await create(store, pub, key="b", cap=1)  # running: the cap is reached
    await send(store, pub, other, "to a running build: fine")
    with pytest.raises(builds.TooManyBuilds):
        await send(store, pub, store.rows[ended.build_id], "continue")


def continued(k: int, iterations: int = 3, cost: int = 9) -> Envelope:
    return ev(
        BuildContinued,
        continuation=k,
        after="completed",
        message_id=f"m{k}",
        iterations=iterations,
        cost_micro_usd=cost,
    )


def test_evolve_a_continued_build_runs_again_once_per_continuation():
    s = projection.evolve(Projection(), ev(BuildRequested, idea_brief="x"), 1)
    done = ev(BuildCompleted, summary="done", iterations=3, cost_micro_usd=9)
    s = projection.evolve(s, done, 2)
    s = projection.evolve(s, continued(1), 3)
    assert (s.status, s.continuations, s.terminal_seq, s.summary, s.finished_at) == (
        "running", 1, None, None, None,
    )  # fmt: skip
    assert (s.iteration, s.cost_micro_usd) == (3, 9)
    assert projection.evolve(s, continued(1), 4).status == "running"  # a repeat: one effect
    assert projection.evolve(s, done, 5).status == "running"  # the first run's end, again
    it = ev(IterationCompleted, iteration=4, model="m", usage=Usage(), stop_reason="x",
            cost_micro_usd=2)  # fmt: skip
    s = projection.evolve(s, it, 6)
    end = ev(BuildCompleted, summary="again", iterations=4, cost_micro_usd=11, continuation=1)
    s = projection.evolve(s, end, 7)
    assert (s.status, s.summary, s.iteration, s.cost_micro_usd, s.terminal_seq) == (
        "completed", "again", 4, 11, 7,
    )  # fmt: skip
    assert projection.evolve(s, continued(1), 8).status == "completed"  # a late repeat


async def test_event_stream_passes_the_ends_of_runs_the_build_continued_from():
    src = FakeHistory(
        [
            StoredEvent(4, "build_completed", b'{"continuation": 0}'),
            StoredEvent(5, "send_user_message", b'{"text": "more"}'),
            StoredEvent(6, "build_continued", b'{"continuation": 1}'),
            StoredEvent(7, "build_completed", b'{"continuation": 1}'),
            StoredEvent(8, "agent_narrated", b"{}"),
        ]
    )
    now = datetime.now(UTC)
    build = Build("b1", "u1", "pro", "x", [], {}, now, now,
                  state=Projection(status="completed", terminal_seq=7, continuations=1))  # fmt: skip
    out = [chunk async for chunk in history.event_stream(src, build, 0, 15)]
    assert [c.split("\n")[0] for c in out[1:]] == ["id: 4", "id: 5", "id: 6", "id: 7"]


def _build(state: Projection, build_id: str = "b1") -> Build:
    return Build(
        build_id=build_id, user_id="u1", tier="pro", idea_brief="x", understanding_qna=[],
        limits={}, created_at=datetime.now(UTC), updated_at=datetime.now(UTC), state=state,
    )  # fmt: skip


def test_previews_are_projected_per_port_and_the_proxy_reaches_only_the_builds_own():
    from kiln_contracts import PreviewAvailable, PreviewGone
    from kiln_gateway import previews

    s = projection.evolve(Projection(), ev(BuildRequested, idea_brief="x"), 1)
    up = ev(
        PreviewAvailable, process_id="bash_1", port=8000, provider="local", sandbox_id="b1",
        url="/v1/builds/b1/preview/8000/",
    )  # fmt: skip
    s = projection.evolve(s, up, 2)
    build = _build(s)
    (shown,) = BuildOut.of(build).previews
    assert (shown.port, shown.status, shown.url) == (8000, "available", up.url)
    assert previews.target(build, 8000, "b1", frozenset({8080})) == ("127.0.0.1", 8000)

    def refused(b: Build, port: int, holder: str | None = "b1") -> int:
        with pytest.raises(previews.Unreachable) as err:
            previews.target(b, port, holder, frozenset({8080}))
        return err.value.status

    assert refused(build, 8001) == 404  # no process of the build listens there
    assert refused(build, 8080) == 403  # the gateway's own port
    assert refused(build, 8000, holder="b2") == 404  # taken since by another build
    assert refused(build, 8000, holder=None) == 404
    # another process's gone for that port changes nothing; its own ends it
    s2 = projection.evolve(s, ev(PreviewGone, process_id="bash_9", port=8000, reason="x"), 3)
    assert BuildOut.of(_build(s2)).previews[0].status == "available"
    s2 = projection.evolve(s2, ev(PreviewGone, process_id="bash_1", port=8000, reason="ended"), 4)
    assert (BuildOut.of(_build(s2)).previews[0].status, refused(_build(s2), 8000)) == (
        "gone", 410
    )  # fmt: skip
    # asleep: gone, and the proxy says so
    asleep = projection.evolve(s, ev(BuildSleeping, reason="budget"), 5)
    (shown,) = BuildOut.of(_build(asleep)).previews
    assert (shown.status, shown.reason) == ("gone", "the build is sleeping")
    assert refused(_build(asleep), 8000) == 503
    # an e2b preview is the sandbox's host, never proxied
    e2b = up.model_copy(
        update={"port": 3000, "provider": "e2b", "url": "https://3000-sbx.e2b.app/"}
    )
    s3 = projection.evolve(s, e2b, 6)
    assert refused(_build(s3), 3000) == 404
    assert {p.port: p.url for p in BuildOut.of(_build(s3)).previews}[3000] == e2b.url


def test_the_proxy_checks_in_proc_that_the_builds_process_session_holds_the_port():
    import os
    import socket

    from kiln_gateway import previews

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
        assert not previews.held_by(port, os.getsid(0))  # bound, not listening yet
        s.listen()
        assert previews.held_by(port, os.getsid(0))
        assert not previews.held_by(port, os.getsid(0) + 100_000)  # another session's
    assert not previews.held_by(port, os.getsid(0))  # closed
    state = dataclasses.replace(
        Projection(),
        processes='[{"process_id": "bash_1", "status": "running", "pid": 41},'
        ' {"process_id": "bash_2", "status": "stopped", "pid": 42}]',
    )
    assert previews.process_pid(_build(state), "bash_1") == 41
    assert previews.process_pid(_build(state), "bash_2") is None  # not running
    assert previews.process_pid(_build(state), "bash_3") is None
