"""The gateway's domain: creating builds, projecting events onto them, replaying their history.

Plain async functions over the ports; no web framework and no broker here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime

from kiln_contracts import (
    TERMINAL_KINDS,
    BudgetGate,
    BuildCancelled,
    BuildCompleted,
    BuildContinued,
    BuildFailed,
    BuildLimits,
    BuildRejected,
    BuildRequested,
    BuildResumed,
    BuildSleeping,
    Envelope,
    ForkOrigin,
    IterationCompleted,
    PreviewAvailable,
    PreviewGone,
    ProcessExited,
    ProcessStarted,
    QnA,
    SendUserMessage,
    SnapshotSaved,
    TopUpRequested,
    stable_id,
)
from kiln_runtime.errors import RetryLater

from . import model, waiting
from .model import Build, Caller, Message, NewBuild, NewMessage, Projection
from .ports import BuildStore, EventSource, Publish, StoredEvent
from .previews import previews_after

log = logging.getLogger(__name__)


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request."""


class TooManyBuilds(Exception):
    def __init__(self, cap: int) -> None:
        super().__init__(f"your tier allows {cap} concurrent build(s); wait for one to finish")
        self.cap = cap


class AllowanceUsedUp(Exception):
    """The user's budget gate is closed: no build starts until the reset or a top-up."""

    def __init__(self, gate: BudgetGate) -> None:
        super().__init__(gate.refusal())
        self.gate = gate


class PublishFailed(Exception):
    """The build is stored but could not be handed to the bus yet; it will be republished."""

    def __init__(self, build_id: str) -> None:
        super().__init__(f"build {build_id} is stored but could not be queued yet; retry")
        self.build_id = build_id


def key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def request_digest(
    idea_brief: str,
    qna: list[QnA],
    limits: BuildLimits | None,
    project: tuple[str, int | None] | None = None,
    fork: dict[str, object] | None = None,
) -> str:
    """The request's fingerprint; for a project build, the project and the version *asked for*
    (an Idempotency-Key replay after the project was edited still returns the same build); for
    a fork, what was asked (source and iteration or snapshot)."""
    doc: dict[str, object] = {"limits": limits.model_dump(mode="json") if limits else None}
    if fork is not None:
        doc["fork"] = fork
    elif project is None:
        doc["idea_brief"] = idea_brief
        doc["understanding_qna"] = [q.model_dump(mode="json") for q in qna]
    else:
        doc["project"] = list(project)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------- API keys


async def authenticate(store: BuildStore, api_key: str | None) -> Caller | None:
    if not api_key:
        return None
    return await store.caller_for_key(key_digest(api_key))


async def ensure_dev_key(store: BuildStore, api_key: str, user_id: str, tier: str) -> None:
    await store.upsert_key(key_digest(api_key), user_id, tier)


# ---------------------------------------------------------------------------- creating builds


def build_requested(build: Build) -> BuildRequested:
    """The event that starts ``build``; the same event (same id) every time it is published."""
    return BuildRequested(
        event_id=stable_id(build.build_id, BuildRequested.kind),
        build_id=build.build_id,
        user_id=build.user_id,
        occurred_at=build.created_at,
        tier=build.tier,
        idea_brief=build.idea_brief,
        understanding_qna=[QnA.model_validate(q) for q in build.understanding_qna],
        limits=BuildLimits.model_validate(build.limits),
        fork=fork_origin(build),
    )


def qna_of(build: Build) -> list[QnA]:
    return [QnA.model_validate(q) for q in build.understanding_qna]


def limits_of(build: Build) -> BuildLimits:
    return BuildLimits.model_validate(build.limits)


def fork_origin(build: Build) -> ForkOrigin | None:
    """Where a forked build starts from (None: it is no fork)."""
    if build.fork_of is None:
        return None
    return ForkOrigin(
        build_id=build.fork_of,
        iteration=build.fork_iteration or 0,
        snapshot_id=build.fork_snapshot_id,
    )


async def create_build(
    store: BuildStore,
    publish: Publish,
    caller: Caller,
    *,
    idea_brief: str,
    understanding_qna: list[QnA],
    limits: BuildLimits | None,
    idempotency_key: str | None,
    cap: int,
    project: tuple[str, int] | None = None,
    project_asked: tuple[str, int | None] | None = None,
    gate: BudgetGate | None = None,
    now: datetime | None = None,
    fork: ForkOrigin | None = None,
    fork_asked: dict[str, object] | None = None,
) -> tuple[Build, bool]:
    """Store a build, then publish its BuildRequested. Returns (build, created).

    The row is written first, so a failed publish never loses the build: a retry with the same
    Idempotency-Key republishes it, and so does the periodic ``republish_pending``. Behind the
    user's closed budget ``gate`` nothing new is stored (AllowanceUsedUp); a retry of a build
    created before still gets it.
    """
    closed = gate is not None and gate.closed_at(now or datetime.now(UTC))
    digest = request_digest(idea_brief, understanding_qna, limits, project_asked, fork_asked)
    new = NewBuild(
        build_id=uuid.uuid4().hex,
        user_id=caller.user_id,
        tier=caller.tier,
        idea_brief=idea_brief,
        understanding_qna=[q.model_dump(mode="json") for q in understanding_qna],
        limits=(limits or BuildLimits()).model_dump(mode="json"),
        idempotency_key=idempotency_key,
        request_sha256=digest,
        project_id=project[0] if project else None,
        project_version=project[1] if project else None,
        fork_of=fork.build_id if fork else None,
        fork_iteration=fork.iteration if fork else None,
        fork_snapshot_id=fork.snapshot_id if fork else None,
    )
    # closed: a cap of 0 admits none, while an Idempotency-Key retry still finds its build
    inserted = await store.insert_build(new, cap=0 if closed else cap)
    if inserted.outcome == "capped":
        if closed:
            assert gate is not None
            raise AllowanceUsedUp(gate)
        raise TooManyBuilds(cap)
    build = inserted.build
    assert build is not None
    if inserted.outcome == "existing" and build.request_sha256 != digest:
        raise IdempotencyConflict(
            "this Idempotency-Key was already used with a different request body"
        )
    if build.published_at is None:
        await _publish(store, publish, build)
        build = replace(build, published_at=build.created_at)
    return build, inserted.outcome == "created"


async def _publish(store: BuildStore, publish: Publish, build: Build) -> None:
    try:
        await publish(build_requested(build))
    except Exception as err:
        log.warning(
            "could not publish build_requested: %s", err, extra={"build_id": build.build_id}
        )
        raise PublishFailed(build.build_id) from err
    await store.mark_published(build.build_id)


async def republish_pending(store: BuildStore, publish: Publish, older_than_s: float) -> int:
    """Publish the builds whose publish failed; the stable event id makes a repeat harmless."""
    count = 0
    for build in await store.unpublished(older_than_s):
        try:
            await _publish(store, publish, build)
            count += 1
        except PublishFailed:
            break
    return count


# ---------------------------------------------------------------------------- messages


class MessagePublishFailed(Exception):
    """The message is stored but could not be handed to the bus yet; it will be republished."""


def user_message(message: Message) -> SendUserMessage:
    """The command that delivers ``message``; the same (same id) every time it is published."""
    return SendUserMessage.of(
        message.build_id,
        message.user_id,
        message.message_id,
        message.seq,
        message.text,
        occurred_at=message.created_at,
    )


async def send_message(
    store: BuildStore,
    publish: Publish,
    caller: Caller,
    build: Build,
    *,
    text: str,
    idempotency_key: str | None,
    cap: int,
) -> tuple[Message, bool]:
    """Store a message to the caller's ``build`` as its next, then publish every message of the
    build not published yet, in order (this one last). Returns (message, created). A build that
    has ended continues with it, so it counts towards the caller's concurrent builds."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    new = NewMessage(
        message_id=uuid.uuid4().hex,
        build_id=build.build_id,
        user_id=caller.user_id,
        text=text,
        request_sha256=digest,
        idempotency_key=idempotency_key,
    )
    inserted = await store.insert_message(new, cap=cap)
    if inserted.outcome == "capped":
        raise TooManyBuilds(cap)
    message = inserted.message
    assert message is not None
    if inserted.outcome == "existing" and message.request_sha256 != digest:
        raise IdempotencyConflict("this Idempotency-Key was already used with a different text")
    if message.published_at is None:
        try:
            await _publish_messages(store, publish, build.build_id)
        except Exception as err:
            log.warning("could not publish a message: %s", err, extra={"build_id": build.build_id})
            raise MessagePublishFailed(message.message_id) from err
    return message, inserted.outcome == "created"


async def _publish_messages(store: BuildStore, publish: Publish, build_id: str) -> None:
    for message in await store.unpublished_messages(build_id):
        await publish(user_message(message))
        await store.mark_message_published(message.message_id)


async def republish_pending_messages(
    store: BuildStore, publish: Publish, older_than_s: float
) -> int:
    """Publish the messages whose publish failed, in order per build (the agent takes a build's
    messages in order: a later one waits for an earlier one still unpublished)."""
    count = 0
    for message in await store.unpublished_messages(None, older_than_s):
        try:
            await publish(user_message(message))
        except Exception:
            break
        await store.mark_message_published(message.message_id)
        count += 1
    return count


# ---------------------------------------------------------------------------- the read model


MAX_PROCESSES = 50


def processes_after(processes: str, event: ProcessStarted | ProcessExited) -> str:
    """The projection's JSON list of processes after a process event (in any order: an exit
    that comes first is kept, and the start fills in the rest)."""
    listed: list[dict[str, object]] = json.loads(processes or "[]")
    entry = next((p for p in listed if p.get("process_id") == event.process_id), None)
    if entry is None:
        entry = {"process_id": event.process_id, "status": "running"}
        listed.append(entry)
    if isinstance(event, ProcessStarted):
        entry.update(command=event.command, pid=event.pid, sandbox_id=event.sandbox_id)
        entry.setdefault("status", "running")
    else:
        entry.update(status=event.how, exit_code=event.exit_code, reason=event.reason)
    return json.dumps(listed[-MAX_PROCESSES:])


def evolve(state: Projection, event: Envelope, seq: int) -> Projection:
    """The build's projected state after ``event`` (stream sequence ``seq``). Terminal states
    stick until the build continues (``BuildContinued``: running again, once per continuation);
    a snapshot still counts after the end (the final one is taken after it)."""
    new = replace(
        state, last_seq=max(state.last_seq, seq), waiting=waiting.after(state.waiting, event)
    )
    if isinstance(event, SnapshotSaved):
        return replace(new, last_snapshot_id=event.snapshot_id)
    if isinstance(event, ProcessStarted | ProcessExited):  # after the end too: stopped then
        return replace(new, processes=processes_after(state.processes, event))
    if isinstance(event, PreviewAvailable | PreviewGone):  # gone after the end too
        return replace(new, previews=previews_after(state.previews, event, seq))
    if isinstance(event, BuildContinued):
        if event.continuation <= state.continuations:
            return new  # a repeat
        return replace(
            new,
            status=model.RUNNING,
            continuations=event.continuation,
            iteration=max(state.iteration, event.iterations),
            cost_micro_usd=max(state.cost_micro_usd, event.cost_micro_usd),
            summary=None,
            reason=None,
            terminal_seq=None,
            finished_at=None,
        )
    if isinstance(event, BuildCompleted | BuildFailed | BuildCancelled) and (
        event.continuation < state.continuations
    ):
        return new  # the end of a run the build has continued from
    if state.terminal:
        return new
    if isinstance(event, BuildRequested):
        if state.status == model.QUEUED:
            new = replace(new, status=model.RUNNING)
        if event.fork is not None:  # a fork starts at its source's iteration
            new = replace(new, iteration=max(new.iteration, event.fork.iteration))
    elif isinstance(event, IterationCompleted):
        new = replace(
            new,
            iteration=max(state.iteration, event.iteration),
            cost_micro_usd=state.cost_micro_usd + event.cost_micro_usd,
        )
    elif isinstance(event, BuildSleeping):
        new = replace(new, status=model.SLEEPING, reason=event.reason)
    elif isinstance(event, BuildResumed):
        if state.status in (model.SLEEPING, model.QUEUED):
            new = replace(new, status=model.RUNNING, reason=None)
    elif isinstance(event, BuildCompleted | BuildFailed | BuildCancelled):
        status = {
            BuildCompleted.kind: model.COMPLETED,
            BuildFailed.kind: model.FAILED,
            BuildCancelled.kind: model.CANCELLED,
        }[event.kind]
        if isinstance(event, BuildCompleted):
            summary, reason = event.summary, None
        elif isinstance(event, BuildFailed):
            summary = None
            reason = f"{event.reason}: {event.detail}" if event.detail else event.reason
        else:
            summary, reason = None, event.reason
        new = replace(
            new,
            status=status,
            iteration=max(state.iteration, event.iterations),
            cost_micro_usd=max(state.cost_micro_usd, event.cost_micro_usd),
            summary=summary,
            reason=reason,
            terminal_seq=seq,
            finished_at=event.occurred_at,
        )
    elif isinstance(event, BuildRejected):
        new = replace(
            new,
            status=model.REJECTED,
            reason=event.reason,
            terminal_seq=seq,
            finished_at=event.occurred_at,
        )
    return new


async def project(store: BuildStore, event: Envelope, seq: int, num_delivered: int = 1) -> str:
    """Apply one event of the stream to the builds read model; idempotent by stream sequence."""
    if isinstance(event, TopUpRequested):
        return "not a build"  # a command to the budget, on the user's budget subject
    if isinstance(event, BuildRequested):
        await store.insert_from_event(event)
    outcome = await store.update_projection(event.build_id, seq, lambda s: evolve(s, event, seq))
    if outcome == "missing" and num_delivered < 3:
        # The build's BuildRequested may still be on its way back (redelivered); wait for it.
        raise RetryLater(f"unknown build {event.build_id}", delay_s=2.0)
    return outcome


# ---------------------------------------------------------------------------- history (SSE)


HEARTBEAT = ": heartbeat\n\n"
RETRY = "retry: 2000\n\n"


def sse_frame(ev: StoredEvent) -> str:
    """One Server-Sent Event: ``id`` = stream sequence, ``event`` = kind, ``data`` = the message."""
    text = ev.data.decode("utf-8", errors="replace")
    lines = [f"id: {ev.seq}", f"event: {ev.kind}"]
    lines += [f"data: {line}" for line in (text.splitlines() or [""])]
    return "\n".join(lines) + "\n\n"


async def event_stream(
    events: EventSource, build: Build, after_seq: int, idle_s: float
) -> AsyncIterator[str]:
    """The build's history after ``after_seq`` then live events as SSE text, ending after the
    end of its current run (as the read model knows it when the stream starts: the ends of the
    runs it continued from pass by); a heartbeat comment after ``idle_s`` of quiet."""
    terminal_seq = build.state.terminal_seq
    if terminal_seq is not None and after_seq >= terminal_seq:
        return  # the client has already seen the end
    yield RETRY
    async with contextlib.aclosing(events.history(build.build_id, after_seq, idle_s)) as history:
        async for ev in history:
            if ev is None:
                yield HEARTBEAT
                continue
            yield sse_frame(ev)
            if ev.kind in TERMINAL_KINDS and _run_of(ev) >= build.state.continuations:
                return


def _run_of(ev: StoredEvent) -> int:
    """The run a terminal event ends (its ``continuation``; 0 when absent or unreadable)."""
    try:
        run = json.loads(ev.data).get("continuation", 0)
    except (ValueError, AttributeError):
        return 0
    return run if isinstance(run, int) else 0
