"""Which addresses recalib may contact on a user's behalf (input URIs, webhooks): SSRF protection.

A URL supplied by a user is fetched only when every address its host resolves to is public:
not loopback, private (RFC 1918, ULA), link-local (cloud metadata at 169.254.169.254), shared
(100.64/10), multicast, reserved or unspecified. The operator allows exceptions by host name or
CIDR in ``RECALIB_OUTBOUND_ALLOW_HOSTS``. :func:`guarded_client` checks every request it sends,
each redirect included, so a public URL cannot redirect into the private network.

Caveat: the check resolves the host, then the HTTP client resolves it again to connect; a DNS
server that answers differently the second time (DNS rebinding) is not caught here. Operators who
need that closed put the fetching workers behind an egress proxy or firewall.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

import httpx

from recalib.errors import InvalidOptionError, OutboundNotAllowedError

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SCHEMES = ("https", "http")


class OutboundPolicy:
    """The operator's exceptions (host names and CIDRs) to the public-addresses-only rule."""

    def __init__(self, allow: Sequence[str] = ()) -> None:
        self.hosts: set[str] = set()
        self.networks: list[IpNetwork] = []
        for entry in (item.strip() for item in allow):
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower().rstrip("."))

    def check_url(self, url: str, *, field: str) -> None:
        """Raise :class:`OutboundNotAllowedError` unless ``url`` may be contacted.

        ``field`` names the request field or setting the URL came from, for the message.
        """
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise InvalidOptionError(
                f"{field}: {url!r} is not an http(s) URL with a host", field=field
            )
        self.check_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                        field=field)  # fmt: skip

    def check_host(self, host: str, port: int, *, field: str) -> None:
        """Raise unless every address ``host`` resolves to is public or allowed."""
        name = host.lower().rstrip(".")
        if name in self.hosts:
            return
        for address in resolve(name, port, field=field):
            if not is_public(address) and not any(address in n for n in self.networks):
                raise OutboundNotAllowedError(
                    f"{field}: {host} resolves to {address}, a {_kind(address)} address; "
                    "recalib contacts only public addresses unless the operator lists the host "
                    "or its network in RECALIB_OUTBOUND_ALLOW_HOSTS",
                    field=field,
                )


def resolve(host: str, port: int, *, field: str) -> list[IpAddress]:
    """Every address ``host`` resolves to (an IP literal resolves to itself)."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidOptionError(
            f"{field}: cannot resolve host {host!r} ({exc})", field=field
        ) from exc
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


def is_public(address: IpAddress) -> bool:
    """True for a globally routable unicast address (IPv4-mapped IPv6 judged as its IPv4)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def _kind(address: IpAddress) -> str:
    for attribute in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(address, f"is_{attribute}", False):
            return attribute.replace("_", "-")
    return "non-public"


def guarded_client(policy: OutboundPolicy, *, field: str, **kwargs: object) -> httpx.Client:
    """An ``httpx.Client`` that checks each request (redirects included) against ``policy``."""

    def check(request: httpx.Request) -> None:
        policy.check_url(str(request.url), field=field)

    hooks = {"request": [check]}
    return httpx.Client(event_hooks=hooks, **kwargs)  # type: ignore[arg-type]
