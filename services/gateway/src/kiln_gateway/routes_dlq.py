"""The dead letters (admin): ``GET /v1/admin/dlq``, ``GET /v1/admin/dlq/{seq}`` and
``POST /v1/admin/dlq/{seq}/replay``, read from and written to ``KILN_DLQ`` on the gateway's bus
connection (kiln_runtime.dead_letters does the reading and the replay)."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, Field

from kiln_runtime import dead_letters

from .deps import Key, Rt, require_admin
from .problems import responses

log = logging.getLogger(__name__)

router = APIRouter()

Name = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class DeadLetterOut(BaseModel):
    seq: int = Field(description="The dead letter's sequence in KILN_DLQ (what to show/replay).")
    service: str = Field(description="The service that gave up on the message.")
    kind: str
    reason: str
    cause: str = Field(description="max_deliver, an exception's class, or rejected.")
    original_subject: str
    original_seq: int | None
    at: datetime | None
    size: int


class DeadLetterGroup(BaseModel):
    service: str
    kind: str
    cause: str
    count: int
    first_seq: int
    last_seq: int
    example_reason: str


class DeadLetterList(BaseModel):
    dead_letters: list[DeadLetterOut]
    groups: list[DeadLetterGroup] = Field(description="How often: per service, kind and cause.")
    next_after: int | None = Field(description="Pass as ?after= for the next page.")


class DeadLetterDetail(DeadLetterOut):
    payload: Any = Field(description="The message as it was (JSON), or its text.")


class Replayed(BaseModel):
    seq: int
    subject: str
    msg_id: str
    kept: bool


@router.get(
    "/v1/admin/dlq",
    response_model=DeadLetterList,
    tags=["admin"],
    responses=responses(401, 422, 503),
)
async def list_dlq(
    rt: Rt,
    key: Key,
    service: Name = None,
    kind: Name = None,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DeadLetterList:
    """The dead letters, oldest first, and how often each (service, kind, cause) happened in
    this page (admin key)."""
    require_admin(rt, key)
    try:
        letters = await dead_letters.list_dead_letters(
            rt.bus.nc, service=service, kind=kind, after=after, limit=limit
        )
    except Exception as err:
        log.warning("reading KILN_DLQ failed: %s", err)
        raise HTTPException(503, "the dead-letter stream cannot be read now; retry") from err
    if not service and not kind and not after and len(letters) < limit:
        dead_letters.observe(letters)  # a full listing: the gauge is exact
    return DeadLetterList(
        dead_letters=[DeadLetterOut(**d.summary()) for d in letters],
        groups=[DeadLetterGroup(**g) for g in dead_letters.group(letters)],
        next_after=letters[-1].seq if len(letters) == limit else None,
    )


# A stream sequence: 1 and up (a bad one is a 422, never a question to the server).
Seq = Annotated[
    int, Path(ge=1, le=2**63 - 1, description="The dead letter's sequence in KILN_DLQ.")
]


async def _one(rt: Rt, seq: int) -> dead_letters.DeadLetter:
    try:
        letter = await dead_letters.get_dead_letter(rt.bus.nc, seq)
    except Exception as err:
        raise HTTPException(503, "the dead-letter stream cannot be read now; retry") from err
    if letter is None:
        raise HTTPException(404, f"no dead letter {seq} (replayed, expired or never there)")
    return letter


@router.get(
    "/v1/admin/dlq/{seq}",
    response_model=DeadLetterDetail,
    tags=["admin"],
    responses=responses(401, 404, 422, 503),
)
async def show_dlq(rt: Rt, key: Key, seq: Seq) -> DeadLetterDetail:
    """One dead letter with its payload (admin key)."""
    require_admin(rt, key)
    letter = await _one(rt, seq)
    try:
        payload: Any = json.loads(letter.data)
    except ValueError:
        payload = letter.data.decode(errors="replace")
    return DeadLetterDetail(**letter.summary(), payload=payload)


@router.post(
    "/v1/admin/dlq/{seq}/replay",
    response_model=Replayed,
    tags=["admin"],
    responses=responses(401, 404, 409, 422, 503),
)
async def replay_dlq(
    rt: Rt,
    key: Key,
    seq: Seq,
    keep: Annotated[bool, Query(description="Keep the dead letter after replaying it.")] = False,
) -> Replayed:
    """Publish the dead letter again to its original subject with a new message id, once its
    cause is fixed; it leaves KILN_DLQ unless ``keep`` (admin key)."""
    require_admin(rt, key)
    letter = await _one(rt, seq)
    try:
        msg_id = await dead_letters.replay(rt.bus.nc, letter, keep=keep)
    except dead_letters.NotReplayable as err:
        raise HTTPException(409, str(err)) from err
    except Exception as err:
        log.warning("replaying dead letter %d failed: %s", seq, err)
        raise HTTPException(503, "the bus did not take the replay; retry") from err
    log.info("replayed dead letter %d to %s as %s", seq, letter.original_subject, msg_id)
    return Replayed(seq=seq, subject=letter.original_subject, msg_id=msg_id, kept=keep)
