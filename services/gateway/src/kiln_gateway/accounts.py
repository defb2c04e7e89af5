"""API keys (created and revoked by an admin) and short-lived event-stream tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from .builds import key_digest
from .model import ApiKey, Caller
from .ports import BuildStore

KEY_PREFIX = "kiln_"
SHOWN_PREFIX = 12  # "kiln_" + 7 characters: enough to name a key in `kiln keys revoke`


class KeyNotFound(Exception):
    pass


class AmbiguousKey(Exception):
    pass


@dataclass(frozen=True)
class NewKey:
    key: str  # shown once, never stored
    record: ApiKey


async def create_key(store: BuildStore, user_id: str, tier: str) -> NewKey:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = key_digest(key)
    record = await store.create_key(digest, digest[:16], key[:SHOWN_PREFIX], user_id, tier)
    return NewKey(key, record)


async def revoke_key(store: BuildStore, ident: str) -> ApiKey:
    """Revoke the key whose id is ``ident`` or whose shown prefix starts with it (one only)."""
    found = await store.find_keys(ident)
    exact = [k for k in found if k.key_id == ident]
    matches = exact or found
    if not matches:
        raise KeyNotFound(f"no API key with id or prefix {ident!r}")
    if len(matches) > 1:
        raise AmbiguousKey(f"{len(matches)} keys match {ident!r}; give the key id")
    revoked = await store.revoke_key(matches[0].key_id)
    if revoked is None:
        raise KeyNotFound(f"no API key with id or prefix {ident!r}")
    return revoked


# ---------------------------------------------------------------------------- stream tokens
#
# A browser's EventSource cannot send an Authorization header, so the dashboard trades its key
# for a token naming one build and one user, signed with the gateway's secret, valid for a while,
# and passes it as ?token= on that build's event stream only.


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def stream_token(secret: bytes, caller: Caller, build_id: str, ttl_s: int) -> tuple[str, int]:
    expires = int(time.time()) + ttl_s
    body = _b64(json.dumps([caller.user_id, caller.tier, build_id, expires]).encode())
    sig = _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())
    return f"{body}.{sig}", expires


def check_stream_token(secret: bytes, token: str, build_id: str) -> Caller | None:
    """The caller the token was issued to, if it is genuine, unexpired and for ``build_id``."""
    body, _, sig = token.partition(".")
    expected = _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())
    if not sig or not hmac.compare_digest(sig, expected):
        return None
    try:
        user_id, tier, for_build, expires = json.loads(_unb64(body))
    except (ValueError, TypeError):
        return None
    if for_build != build_id or not isinstance(expires, int) or expires < time.time():
        return None
    return Caller(str(user_id), str(tier))
