"""Users' messages to builds: stored as a build's next, published in order, republished when the
publish failed.
"""

from __future__ import annotations

import hashlib
import logging
import uuid

from kiln_contracts import SendUserMessage

from .builds import IdempotencyConflict, TooManyBuilds
from .model import Build, Caller, Message, NewMessage
from .ports import BuildStore, Publish

log = logging.getLogger(__name__)


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
