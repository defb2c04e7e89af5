"""Load, advance, save, publish: the one way a build's checkpoint changes. A step loads the
checkpoint, advances it with a transition (plain functions: ``transitions.py``, ``control.py``,
``compaction.py``), saves it (optimistic concurrency on its version) and only then publishes what
the step produced.

The messages a step produces are stored in the row (its outbox) in the same write; the next
handling of any message of the build republishes an outbox that was never marked sent, with the
same stable event ids, so a crash between commit and publish loses nothing and duplicates nothing.
"""

from __future__ import annotations

import contextlib
import logging

from kiln_runtime.errors import Conflict, PermanentError, RetryLater
from kiln_runtime.retry import retry

from .caching_store import CachingStore
from .checkpoint import Checkpoint
from .ports import LeaseChange, Publisher, VersionConflict
from .transitions import Advance

log = logging.getLogger(__name__)

# Tries at saving a paid reply (full-jitter backoff capped at 5 s: about two minutes).
KEEP_ATTEMPTS = 50


class Driver:
    def __init__(
        self, store: CachingStore, publisher: Publisher, *, save_attempts: int, lease_s: float
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.save_attempts = save_attempts
        self.lease_s = lease_s

    async def step(
        self,
        build_id: str,
        advance: Advance,
        *,
        publish: bool = True,
        first: Checkpoint | None = None,
        give_up: str | None = None,
        take_lease: str | None = None,
    ) -> Checkpoint | None:
        """Load, advance, save (retrying a lost race on fresh state), then publish (unless the
        caller publishes the returned checkpoint's outbox itself). ``first``: a checkpoint the
        caller has loaded, tried before reading it again; else the one kept from the build's
        last message, if any. A change decided on either is checked by the save's version; "no
        change" is confirmed on a fresh read. ``give_up``: a lease token the save gives up.
        ``take_lease``: a token the save takes the think lease for if the build is then
        thinking (the returned checkpoint's ``lease`` says whether it did)."""
        cp = first if first is not None else await self.store.recall(build_id)
        fresh = False
        for _ in range(self.save_attempts):
            if cp is None:
                cp, fresh = await self.store.load(build_id), True
                if cp is None:
                    return None
            await self.flush(cp)
            new_turns = advance(cp)
            if new_turns is None:
                if fresh:
                    return None
                cp = None  # decided on an earlier read: look again
                continue
            take = take_lease if cp.status == "thinking" else None
            try:
                took = await self.store.save(
                    cp, new_turns, LeaseChange(give_up=give_up, take=take, ttl_s=self.lease_s)
                )
            except VersionConflict:
                log.info("version conflict; re-applying", extra={"build_id": build_id})
                cp = None
                continue
            cp.lease = take if took else None
            if publish:
                # a failure here leaves a lease this save took to run out (lease_s): the
                # redelivery of the message then waits for it
                await self.flush(cp)
            return cp
        raise Conflict(f"build {build_id} kept changing under {self.save_attempts} attempts")

    async def keep(self, cp: Checkpoint, advance: Advance, token: str) -> Checkpoint | None:
        """Save a model call's reply on the checkpoint read under the lease of ``token``, giving
        the lease up, its outbox left for the caller to publish (paid for: a reply lost here is
        paid again when the build thinks again), trying again for about two minutes while the
        store cannot be reached."""
        return await retry(
            lambda: self.step(cp.build_id, advance, publish=False, first=cp, give_up=token),
            attempts=KEEP_ATTEMPTS,
            retry_on=(Exception,),
            give_up=lambda err: isinstance(err, RetryLater | PermanentError),
            base=0.5,
            cap=5.0,
            on_retry=lambda err, n: log.warning(
                "could not save the reply (attempt %d): %s; trying again",
                n,
                err,
                extra={"build_id": cp.build_id},
            ),
        )

    async def flush(self, cp: Checkpoint, *, done: bool = False) -> None:
        """Publish the outbox, then have it cleared in the row. ``done``: the handler is done with
        ``cp``, which is kept for the build's next message."""
        if cp.outbox:
            with self.store.returning(cp.build_id) if done else contextlib.nullcontext():
                for msg in cp.outbox:
                    await self.publisher.publish(msg)
                self.store.sent(cp, done=done)
        elif done:
            self.store.done(cp)
