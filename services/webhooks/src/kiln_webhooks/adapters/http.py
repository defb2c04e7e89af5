"""Sending one attempt: aiohttp, connecting only to addresses checked at that connection.

The connector's resolver is ``SafeResolver``: it resolves the host, refuses it if any address is
not safe (``targets``), and hands aiohttp the checked addresses, so the TCP connection goes to
an address that was checked (TLS and the Host header keep the name). No DNS cache, no proxies
from the environment, no redirects; timeouts on connecting and on the response; the body is read
up to a limit.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from .. import targets
from ..ports import AttemptResult


class SafeResolver(AbstractResolver):
    def __init__(self, allowed: tuple[targets.IpNetwork, ...], timeout_s: float) -> None:
        self.allowed = allowed
        self.timeout_s = timeout_s

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await targets.checked_addresses(host, port, self.allowed, self.timeout_s)
        return [
            ResolveResult(
                hostname=host,
                host=str(ip),
                port=port,
                family=fam,
                proto=proto,
                flags=socket.AI_NUMERICHOST,
            )
            for fam, proto, ip in found
        ]

    async def close(self) -> None:
        return None


@dataclass
class HttpSender:
    allowed: tuple[targets.IpNetwork, ...]
    allow_http: bool
    connect_timeout_s: float
    response_timeout_s: float
    max_response_bytes: int
    resolve_timeout_s: float = 3.0
    user_agent: str = "Kiln-Webhooks/1"
    _session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(
            resolver=SafeResolver(self.allowed, self.resolve_timeout_s),
            use_dns_cache=False,
            limit=0,
            limit_per_host=8,
        )
        self._session = aiohttp.ClientSession(
            connector=connector, trust_env=False, auto_decompress=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, url: str, headers: dict[str, str], body: bytes) -> AttemptResult:
        assert self._session is not None, "open() first"
        started = time.monotonic()
        try:
            target = targets.parse(url, allow_http=self.allow_http)
            ip = targets.literal(target.host)
            if ip is not None:  # aiohttp does not ask the resolver about an address literal
                targets.check_address(target.host, ip, self.allowed)
            timeout = aiohttp.ClientTimeout(
                total=self.connect_timeout_s + self.response_timeout_s,
                sock_connect=self.connect_timeout_s,
                sock_read=self.response_timeout_s,
            )
            async with self._session.post(
                url,
                data=body,
                headers={**headers, "user-agent": self.user_agent},
                allow_redirects=False,
                timeout=timeout,
            ) as resp:
                snippet = await resp.content.read(self.max_response_bytes)
                return AttemptResult(
                    ok=200 <= resp.status < 300,
                    status_code=resp.status,
                    error=None if 200 <= resp.status < 300 else _error(resp.status, snippet),
                    seconds=time.monotonic() - started,
                )
        except targets.UnsafeTarget as err:
            return AttemptResult(False, None, str(err), time.monotonic() - started, refused=True)
        except aiohttp.ClientConnectorError as err:
            cause: Any = err.os_error
            refused = isinstance(cause, targets.UnsafeTarget) or isinstance(
                err.__cause__, targets.UnsafeTarget
            )
            text = str(cause) if refused else f"could not connect: {err}"
            return AttemptResult(False, None, text, time.monotonic() - started, refused=refused)
        except TimeoutError:
            return AttemptResult(False, None, "timed out", time.monotonic() - started)
        except (aiohttp.ClientError, OSError, ValueError) as err:
            return AttemptResult(
                False, None, f"{type(err).__name__}: {err}", time.monotonic() - started
            )


def _error(status: int, snippet: bytes) -> str:
    text = snippet[:500].decode("utf-8", "replace")
    if 300 <= status < 400:
        return f"HTTP {status} (redirects are not followed) {text}".strip()
    return f"HTTP {status} {text}".strip()
