"""Which addresses recalib may contact on a user's behalf (input URIs, webhooks): SSRF protection.

A URL supplied by a user is fetched only when every address its host resolves to is public:
not loopback, private (RFC 1918, ULA), link-local (cloud metadata at 169.254.169.254), shared
(100.64/10), multicast, reserved or unspecified. An IPv6 address that carries an IPv4 one
(IPv4-mapped or -compatible, NAT64, 6to4, Teredo) is judged by that IPv4 address too
(:func:`embedded_ipv4`). The operator allows exceptions by host name or CIDR in
``RECALIB_OUTBOUND_ALLOW_HOSTS``. :func:`guarded_client` checks every request it sends,
each redirect included, so a public URL cannot redirect into the private network.

Caveat: the check resolves the host, then the HTTP client resolves it again to connect; a DNS
server that answers differently the second time (DNS rebinding) is not caught here. Operators who
need that closed put the fetching workers behind an egress proxy or firewall.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import httpx

from recalib.errors import InvalidOptionError, OutboundNotAllowedError

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SCHEMES = ("https", "http")

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
# The IPv4 address alone decides where these go; Teredo also needs its IPv6 prefix judged.
_JUDGED_BY_IPV4 = ("IPv4-mapped", "IPv4-translated", "IPv4-compatible", "NAT64", "6to4")


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
            reason = why_not_public(address)
            if reason is not None and not any(address in n for n in self.networks):
                raise OutboundNotAllowedError(
                    f"{field}: {host} resolves to {address}, {reason}; recalib contacts only "
                    "public addresses unless the operator lists the host or its network in "
                    "RECALIB_OUTBOUND_ALLOW_HOSTS",
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
    """True for a globally routable unicast address (an IPv6 one that embeds an IPv4 address
    judged by that IPv4 address too, :func:`embedded_ipv4`)."""
    return why_not_public(address) is None


def why_not_public(address: IpAddress) -> str | None:
    """Why ``address`` may not be contacted (``"a loopback address"``); None when it is public.

    An IPv6 address that carries an IPv4 address reaches that IPv4 host (through the kernel,
    a NAT64 or a 6to4/Teredo relay), yet Python's ``is_global`` judges most such forms by their
    IPv6 prefix alone (``::127.0.0.1`` and ``64:ff9b::7f00:1`` are "global" on 3.11): those are
    judged by the IPv4 address they carry.
    """
    if isinstance(address, ipaddress.IPv6Address) and (embedded := embedded_ipv4(address)):
        form, ipv4s = embedded
        for ipv4 in ipv4s:
            if not _is_public_ipv4(ipv4):
                return f"which embeds the {_kind(ipv4)} IPv4 address {ipv4} ({form})"
        if form == "NAT64 local-use":  # RFC 8215: the operator's own translator, never public
            return f"a NAT64 local-use address (64:ff9b:1::/48, embedding {ipv4s[0]})"
        if form in _JUDGED_BY_IPV4:
            return None
    if not address.is_global or address.is_multicast:
        return f"a {_kind(address)} address"
    return None


def embedded_ipv4(
    address: ipaddress.IPv6Address,
) -> tuple[str, list[ipaddress.IPv4Address]] | None:
    """The form and the IPv4 address(es) that ``address`` carries, or None.

    IPv4-mapped ``::ffff:a.b.c.d``, IPv4-translated ``::ffff:0:a.b.c.d`` (SIIT), IPv4-compatible
    ``::a.b.c.d`` (deprecated; ``::`` and ``::1`` excluded), NAT64 ``64:ff9b::/96`` and local-use
    ``64:ff9b:1::/48`` (the last 32 bits), 6to4 ``2002::/16`` (bits 16-48), Teredo
    ``2001::/32`` (its server and its de-obfuscated client).
    """
    low = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.ipv4_mapped is not None:
        return "IPv4-mapped", [address.ipv4_mapped]
    if address.teredo is not None:
        return "Teredo", list(address.teredo)
    if address.sixtofour is not None:
        return "6to4", [address.sixtofour]
    for network, form in (
        (_NAT64, "NAT64"),
        (_NAT64_LOCAL, "NAT64 local-use"),
        (_IPV4_TRANSLATED, "IPv4-translated"),
    ):
        if address in network:
            return form, [low]
    if address in _IPV4_COMPATIBLE and int(address) > 1:
        return "IPv4-compatible", [low]
    return None


def _is_public_ipv4(address: ipaddress.IPv4Address) -> bool:
    return address.is_global and not address.is_multicast


def _kind(address: IpAddress) -> str:
    for attribute in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(address, f"is_{attribute}", False):
            return attribute.replace("_", "-")
    return "non-public"


def guarded_client(
    policy: OutboundPolicy,
    *,
    field: str,
    on_request: Sequence[Callable[[httpx.Request], None]] = (),
    **kwargs: object,
) -> httpx.Client:
    """An ``httpx.Client`` that checks each request (redirects included) against ``policy``,
    then passes it to each of ``on_request`` (more request hooks)."""

    def check(request: httpx.Request) -> None:
        policy.check_url(str(request.url), field=field)

    hooks = {"request": [check, *on_request]}
    return httpx.Client(event_hooks=hooks, **kwargs)  # type: ignore[arg-type]
