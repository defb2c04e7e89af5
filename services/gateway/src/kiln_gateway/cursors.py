"""The opaque cursors of the paged lists (builds, projects): a row's creation time and id."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, TypeVar

from fastapi import HTTPException, Query

T = TypeVar("T")

Cursor = Annotated[str | None, Query(max_length=500)]
"""The ``?cursor=`` of a paged list: the ``next_cursor`` of the page before."""


def encode_cursor(created_at: datetime, ident: str) -> str:
    raw = json.dumps([created_at.isoformat(), ident]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, ident = json.loads(raw)
        return datetime.fromisoformat(created), str(ident)
    except (binascii.Error, ValueError, TypeError) as err:
        raise HTTPException(400, "invalid cursor") from err


async def paged(
    fetch: Callable[[int, tuple[datetime, str] | None], Awaitable[list[T]]],
    limit: int,
    cursor: str | None,
    key: Callable[[T], tuple[datetime, str]],
) -> tuple[list[T], str | None]:
    """One page of a list: at most ``limit`` rows after ``cursor``, and the cursor of the next
    page (None: this is the last). ``fetch(n, before)``: the first ``n`` rows after ``before``
    (None: from the start); ``key``: a row's creation time and id."""
    before = decode_cursor(cursor) if cursor else None
    page = await fetch(limit + 1, before)
    more = len(page) > limit
    page = page[:limit]
    return page, encode_cursor(*key(page[-1])) if more else None
