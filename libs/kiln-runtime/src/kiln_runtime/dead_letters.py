"""Reading and replaying the dead letters in ``KILN_DLQ``.

``Bus.dead_letter`` puts a message there on ``kiln.dlq.<service>.<kind>`` with its payload as it
was and three headers: ``Kiln-Dlq-Reason`` (why), ``Kiln-Original-Subject`` and
``Kiln-Original-Seq``. Here they are listed (newest last, filtered by service and kind),
grouped by the cause of the reason ("how often"), shown one by one, and replayed: the payload is
published again to its original subject with a new ``Nats-Msg-Id`` (the original one is still
in the stream's duplicate window and would be dropped), then the dead letter is deleted unless
the caller keeps it. A repeat of a replay is a repeat of a message, which Kiln's consumers make
harmless by its ``event_id`` (the sandbox's ledger, the checkpoint's outbox).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.aio.client import Client
from nats.js.errors import NotFoundError

from kiln_contracts import subjects

from . import metrics

REASON = "Kiln-Dlq-Reason"
ORIGINAL_SUBJECT = "Kiln-Original-Subject"
ORIGINAL_SEQ = "Kiln-Original-Seq"
REPLAYED_FROM = "Kiln-Replayed-From"

_EXCEPTION = re.compile(r"^([A-Z][A-Za-z0-9_.]*): ")


def cause_of(reason: str) -> str:
    """A short class of a reason, fit for a metric label and for grouping: ``max_deliver`` (the
    consumer gave up redelivering), the exception's class name, or ``rejected`` (a handler's
    ``PermanentError``, or an invalid payload)."""
    if reason.startswith("gave up after"):
        return "max_deliver"
    if m := _EXCEPTION.match(reason):
        return m.group(1).rsplit(".", 1)[-1]
    return "rejected"


@dataclass(frozen=True)
class DeadLetter:
    seq: int  # in KILN_DLQ
    service: str
    kind: str
    reason: str
    cause: str
    original_subject: str
    original_seq: int | None
    at: datetime | None
    data: bytes

    def summary(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "service": self.service,
            "kind": self.kind,
            "reason": self.reason,
            "cause": self.cause,
            "original_subject": self.original_subject,
            "original_seq": self.original_seq,
            "at": self.at,
            "size": len(self.data),
        }


def _filter(service: str | None, kind: str | None) -> str:
    if kind and not service:
        return f"kiln.dlq.*.{kind}"
    return subjects.dlq_subject(service, kind or ">") if service else "kiln.dlq.>"


def _parse(msg: Any) -> DeadLetter:
    headers = msg.headers or {}
    parts = str(msg.subject).split(".")
    service = parts[2] if len(parts) > 2 else "unknown"
    kind = ".".join(parts[3:]) or "unknown"
    reason = headers.get(REASON, "")
    original_seq = headers.get(ORIGINAL_SEQ)
    at = getattr(msg, "time", None)
    return DeadLetter(
        seq=int(msg.seq),
        service=service,
        kind=kind,
        reason=reason,
        cause=cause_of(reason),
        original_subject=headers.get(ORIGINAL_SUBJECT, ""),
        original_seq=int(original_seq) if original_seq and original_seq.isdigit() else None,
        at=at if isinstance(at, datetime) else None,
        data=bytes(msg.data or b""),
    )


async def list_dead_letters(
    nc: Client,
    *,
    service: str | None = None,
    kind: str | None = None,
    after: int = 0,
    limit: int = 100,
) -> list[DeadLetter]:
    """Up to ``limit`` dead letters after sequence ``after``, oldest first."""
    js = nc.jetstream()
    out: list[DeadLetter] = []
    seq = after + 1
    subject = _filter(service, kind)
    while len(out) < limit:
        try:
            msg = await js.get_msg(subjects.DLQ_STREAM, seq=seq, subject=subject, next=True)
        except NotFoundError:
            break
        letter = _parse(msg)
        out.append(letter)
        seq = letter.seq + 1
    return out


async def get_dead_letter(nc: Client, seq: int) -> DeadLetter | None:
    try:
        msg = await nc.jetstream().get_msg(subjects.DLQ_STREAM, seq=seq)
    except NotFoundError:
        return None
    return _parse(msg)


def group(letters: list[DeadLetter]) -> list[dict[str, Any]]:
    """How often: one row per (service, kind, cause), with its count, first and last seq and
    an example reason; the most frequent first."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for d in letters:
        key = (d.service, d.kind, d.cause)
        row = rows.setdefault(
            key,
            {
                "service": d.service,
                "kind": d.kind,
                "cause": d.cause,
                "count": 0,
                "first_seq": d.seq,
                "example_reason": d.reason,
            },
        )
        row["count"] += 1
        row["last_seq"] = d.seq
    return sorted(rows.values(), key=lambda r: (-r["count"], r["service"], r["kind"]))


def observe(letters: list[DeadLetter]) -> None:
    """Set the ``kiln_dlq_messages`` gauge from a full listing."""
    metrics.DLQ_MESSAGES.clear()
    for row in group(letters):
        metrics.DLQ_MESSAGES.labels(row["service"], row["kind"], row["cause"]).set(row["count"])


class NotReplayable(Exception):
    """The dead letter does not say where it came from."""


async def replay(nc: Client, letter: DeadLetter, *, keep: bool = False) -> str:
    """Publish the dead letter's payload to its original subject with a new message id; delete
    it from ``KILN_DLQ`` unless ``keep``. Returns the new message id."""
    if not letter.original_subject.startswith("kiln.build."):
        raise NotReplayable(f"dead letter {letter.seq} has no original subject on the build stream")
    msg_id = f"replay-{letter.seq}-{uuid.uuid4().hex[:12]}"
    js = nc.jetstream()
    await js.publish(
        letter.original_subject,
        letter.data,
        headers={"Nats-Msg-Id": msg_id, REPLAYED_FROM: str(letter.seq)},
        timeout=10,
    )
    metrics.DLQ_REPLAYED.labels(letter.service, letter.kind).inc()
    if not keep:
        try:
            await js.delete_msg(subjects.DLQ_STREAM, letter.seq)
        except NotFoundError:
            pass
    return msg_id
