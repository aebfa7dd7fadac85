"""recalib.inputs.outbound: IPv6 addresses that carry an IPv4 address are judged by that IPv4.

Python's ``is_global`` is true for most of these forms (3.11), so without extracting the IPv4
``http://[::127.0.0.1]/`` would reach the worker's own loopback.
"""

from __future__ import annotations

import pytest

from recalib.errors import OutboundNotAllowedError
from recalib.inputs.outbound import OutboundPolicy

EMBEDS_NON_PUBLIC = [  # (IPv6 literal, the IPv4 it carries)
    ("::ffff:127.0.0.1", "127.0.0.1"),  # IPv4-mapped
    ("::127.0.0.1", "127.0.0.1"),  # IPv4-compatible (deprecated)
    ("::a9fe:a9fe", "169.254.169.254"),  # IPv4-compatible: cloud metadata
    ("::ffff:0:7f00:1", "127.0.0.1"),  # IPv4-translated (SIIT)
    ("64:ff9b::7f00:1", "127.0.0.1"),  # NAT64 well-known prefix
    ("64:ff9b::a00:1", "10.0.0.1"),
    ("64:ff9b:1::7f00:1", "127.0.0.1"),  # NAT64 local-use prefix
    ("2002:7f00:1::", "127.0.0.1"),  # 6to4
    ("2002:a9fe:a9fe::1", "169.254.169.254"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1"),  # Teredo, client (obfuscated)
    ("2001:0:7f00:1:8000:63bf:3fff:fdd2", "127.0.0.1"),  # Teredo, server
]

EMBEDS_PUBLIC = [
    "::ffff:8.8.8.8",
    "::808:808",
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    "2002:808:808::1",  # 6to4 of 8.8.8.8
]


@pytest.mark.parametrize(("ipv6", "ipv4"), EMBEDS_NON_PUBLIC)
def test_an_ipv6_address_that_embeds_a_non_public_ipv4_is_refused(ipv6: str, ipv4: str) -> None:
    with pytest.raises(OutboundNotAllowedError, match="RECALIB_OUTBOUND_ALLOW_HOSTS") as info:
        OutboundPolicy().check_url(f"http://[{ipv6}]/x", field="calibration_uri")
    message = str(info.value)
    assert ipv6 in message and ipv4 in message, message
    assert info.value.field == "calibration_uri"


@pytest.mark.parametrize("ipv6", EMBEDS_PUBLIC)
def test_an_ipv6_address_that_embeds_a_public_ipv4_passes(ipv6: str) -> None:
    OutboundPolicy().check_url(f"https://[{ipv6}]/model.pt2", field="model_uri")


def test_teredo_stays_refused_when_both_its_ipv4_addresses_are_public() -> None:
    # server 65.54.227.120, client 8.8.8.8; 2001::/32 itself is not globally reachable (IANA)
    with pytest.raises(OutboundNotAllowedError):
        OutboundPolicy().check_url("http://[2001:0:4136:e378:8000:63bf:f7f7:f7f7]/", field="f")
