"""Safe targets: a webhook may not reach into Kiln's own network.

A URL is refused when its host is, or resolves to, a loopback, private, link-local, cloud
metadata or otherwise not globally routable address, unless the operator allows that address's
network (``KILN_WEBHOOKS_ALLOWED_NETWORKS``, for development). The check runs at registration and
again at every connection (``adapters.http`` connects only to the addresses checked then; DNS may
have changed since registration), and redirects are never followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud metadata services (AWS, GCP, Azure, OpenStack: 169.254.169.254; AWS IPv6; Alibaba;
# Oracle's 192.0.0.192), refused by name too.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "localhost"}
)


class UnsafeTarget(Exception):
    """The URL may not be a webhook's target; the message says why."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int


def refusal(ip: IpAddress, allowed: Iterable[IpNetwork] = ()) -> str | None:
    """Why ``ip`` may not be connected to (None: it may)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allowed):
        return None
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved or not ip.is_global:
        return "not a globally routable address"
    return None


def networks(spec: str) -> tuple[IpNetwork, ...]:
    """Comma-separated CIDRs (``127.0.0.1/32,10.0.0.0/8``)."""
    return tuple(
        ipaddress.ip_network(p.strip(), strict=False) for p in spec.split(",") if p.strip()
    )


def parse(url: str, *, allow_http: bool) -> Target:
    """The URL's scheme, host and port, or UnsafeTarget for one that is not an http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise UnsafeTarget(f"not a valid URL: {err}") from err
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        raise UnsafeTarget(f"the URL's scheme must be {' or '.join(schemes)}")
    if parts.username is not None or parts.password is not None:
        raise UnsafeTarget("the URL may not carry credentials")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise UnsafeTarget("the URL has no host")
    if host in METADATA_HOSTS or host.endswith(".localhost"):
        raise UnsafeTarget(f"the host {host!r} is refused (local or cloud metadata)")
    if port == 0:
        raise UnsafeTarget("the URL's port must be 1 to 65535")
    return Target(parts.scheme, host, port or (443 if parts.scheme == "https" else 80))


def literal(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_address(host: str, ip: IpAddress, allowed: Iterable[IpNetwork]) -> None:
    why = refusal(ip, allowed)
    if why is not None:
        shown = host if host == str(ip) else f"{host} ({ip})"
        raise UnsafeTarget(f"refused target: {shown} is {why}")


async def resolve(host: str, port: int, timeout_s: float) -> list[tuple[int, int, IpAddress]]:
    """(family, proto, address) of each address ``host`` resolves to."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError as err:
        raise UnsafeTarget(f"{host} did not resolve within {timeout_s} s") from err
    except (OSError, ValueError) as err:  # UnicodeError: a label that IDNA refuses
        raise UnsafeTarget(f"{host} does not resolve: {err}") from err
    out = []
    for family, _, proto, _, sockaddr in infos:
        out.append((int(family), int(proto), ipaddress.ip_address(str(sockaddr[0]))))
    if not out:
        raise UnsafeTarget(f"{host} resolves to no address")
    return out


async def checked_addresses(
    host: str, port: int, allowed: tuple[IpNetwork, ...], timeout_s: float
) -> list[tuple[int, int, IpAddress]]:
    """The addresses to connect to: every one ``host`` resolves to, each checked (any refused
    one refuses the host: a name that answers with a private address among public ones is a
    rebinding attempt)."""
    ip = literal(host)
    if ip is not None:
        check_address(host, ip, allowed)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return [(int(family), socket.IPPROTO_TCP, ip)]
    found = await resolve(host, port, timeout_s)
    for _, _, addr in found:
        check_address(host, addr, allowed)
    return found


async def check_url(
    url: str, *, allowed: tuple[IpNetwork, ...], allow_http: bool, timeout_s: float
) -> Target:
    """Registration's check: a well-formed http(s) URL whose host resolves to safe addresses."""
    target = parse(url, allow_http=allow_http)
    await checked_addresses(target.host, target.port, allowed, timeout_s)
    return target
