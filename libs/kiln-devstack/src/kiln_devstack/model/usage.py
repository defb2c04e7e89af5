"""Usage as the Messages API reports it, prompt caching included, and the response body that
carries it."""

import hashlib
import json
from collections import OrderedDict
from typing import Any

from .prompt import parts
from .summaries import digest


def tokens(value: Any) -> int:
    """A rough token count: a quarter of the characters of the value's JSON."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return len(text) // 4


class UsageEstimator:
    """Usage with prompt caching as the API reports it. The request is read as tools, then system,
    then message blocks. Each cache_control block writes a cache entry for the prefix ending there
    (if at least ``min_cache_tokens`` long); at each one the API looks for an earlier entry at that
    block or up to ``lookback`` blocks before it, and the longest hit is read from the cache.
    ``cache_read_input_tokens`` is that hit, ``cache_creation_input_tokens`` the rest of the prefix
    up to the last breakpoint written, ``input_tokens`` what follows."""

    def __init__(
        self, max_entries: int = 10_000, min_cache_tokens: int = 1024, lookback: int = 20
    ) -> None:
        self.cache: OrderedDict[str, None] = OrderedDict()
        self.max_entries = max_entries
        self.min_cache_tokens = min_cache_tokens
        self.lookback = lookback

    def estimate(self, request: dict[str, Any], output: list[dict[str, Any]]) -> dict[str, int]:
        prompt = parts(request)
        hasher = hashlib.sha256()
        keys: list[str] = []
        sizes: list[int] = []
        total = 0
        for part in prompt:
            hasher.update(part.text.encode())
            total += part.tokens
            keys.append(hasher.hexdigest())
            sizes.append(total)
        marked = [i for i, p in enumerate(prompt) if "cache_control" in p.block]
        read = 0
        for m in marked:
            for j in range(m, max(-1, m - self.lookback), -1):
                if keys[j] in self.cache:
                    read = max(read, sizes[j])
                    self.cache.move_to_end(keys[j])
                    break
        written = read
        for m in marked:
            if sizes[m] >= self.min_cache_tokens:
                self.cache[keys[m]] = None
                written = max(written, sizes[m])
        while len(self.cache) > self.max_entries:
            self.cache.popitem(last=False)
        return {
            "input_tokens": max(1, total - written),
            "output_tokens": max(1, sum(tokens(b) for b in output)),
            "cache_creation_input_tokens": written - read,
            "cache_read_input_tokens": read,
        }


def response_body(
    request: dict[str, Any],
    content: list[dict[str, Any]],
    stop: str,
    usage: dict[str, int],
    message_id: str | None = None,
) -> dict[str, Any]:
    """A Messages API response body with ``content`` and ``usage``; its id ``message_id``, else
    one derived from the request's messages."""
    return {
        "id": message_id or f"msg_{digest(request.get('messages') or [])}",
        "type": "message",
        "role": "assistant",
        "model": request.get("model") or "scripted",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    }
