"""``POST /v1/builds/{id}/messages``: a user writes to a build (the domain in ``messages``)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from . import builds, messages
from .deps import IdempotencyKey, Me, Owned, Rt
from .problems import responses
from .schemas_builds import MessageOut, SendMessage
from .starting import tier_of

router = APIRouter()


@router.post(
    "/v1/builds/{build_id}/messages",
    status_code=202,
    response_model=MessageOut,
    tags=["builds"],
    responses=responses(401, 403, 404, 409, 413, 422, 429, 503),
)
async def send_message(
    body: SendMessage,
    build: Owned,
    rt: Rt,
    me: Me,
    idempotency_key: IdempotencyKey = None,
) -> MessageOut:
    """Write to a build. A running build reads the message at its next think (after the tool
    results it is waiting for, or the model call it is making); a sleeping one when it wakes; a
    completed, failed or cancelled one continues with it: its conversation kept, its files
    restored into a fresh sandbox from its latest snapshot, a new allowance of iterations and
    cost. Continuing a build counts towards the tier's concurrent builds (429 at the cap).

    Messages are taken in the order they are accepted here (``seq``), each once. Send an
    ``Idempotency-Key`` to make retries safe: the same key is the same message; with another
    text, 409.
    """
    if build.status == "rejected":
        raise HTTPException(
            409, "this build was refused before it started (no allowance left): start a new build"
        )
    tier = tier_of(rt, me)
    try:
        message, _ = await messages.send_message(
            rt.store,
            rt.publish,
            me,
            build,
            text=body.text,
            idempotency_key=idempotency_key,
            cap=tier.concurrent_builds,
        )
    except builds.IdempotencyConflict as err:
        raise HTTPException(409, str(err)) from err
    except builds.TooManyBuilds as err:
        raise HTTPException(
            429, f"{err} before continuing this one", headers={"Retry-After": "30"}
        ) from err
    except messages.MessagePublishFailed as err:
        raise HTTPException(
            503,
            "the message is stored but could not be sent yet; it will be sent shortly, or retry "
            "with the same Idempotency-Key",
            headers={"Retry-After": "2"},
        ) from err
    return MessageOut.of(message)
