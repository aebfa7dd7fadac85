"""API keys → tenants.

``RECALIB_API_KEYS`` holds comma-separated ``tenant:key`` or ``tenant:sha256:<hex of key>``
entries. Keys are kept only as SHA-256 digests in memory and compared with
:func:`hmac.compare_digest` against every entry (so the time taken does not tell which entry, or
how much of one, matched). Keys are never logged. With no keys the API is open and every request
belongs to the tenant ``default``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass

from recalib.errors import InvalidOptionError, UnauthorizedError

logger = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
_TENANT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEX_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class _Key:
    tenant: str
    digest: bytes  # sha256 of the key


def _parse_entry(entry: str, index: int) -> _Key:
    tenant, sep, secret = entry.partition(":")
    if not sep or not secret or not _TENANT_RE.match(tenant):
        # The entry itself is never echoed: it may hold a key.
        raise InvalidOptionError(
            f"RECALIB_API_KEYS entry {index + 1} is not `tenant:key` or `tenant:sha256:<hex>` "
            "(tenant: letters, digits, _ or -, at most 64)",
            field="api_keys",
        )
    kind, sep, hex_digest = secret.partition(":")
    if kind == "sha256" and sep and _HEX_SHA256_RE.match(hex_digest):
        return _Key(tenant, bytes.fromhex(hex_digest))
    return _Key(tenant, hashlib.sha256(secret.encode()).digest())


class ApiKeys:
    """The configured keys; :meth:`tenant_for` resolves an ``Authorization`` header to a tenant."""

    def __init__(self, entries: list[str]) -> None:
        self._keys = [_parse_entry(entry, i) for i, entry in enumerate(entries)]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def tenants(self) -> list[str]:
        return sorted({key.tenant for key in self._keys})

    def tenant_for(self, authorization: str | None) -> str:
        """The tenant of ``Authorization: Bearer <key>``; :class:`UnauthorizedError` otherwise."""
        if not self._keys:
            return DEFAULT_TENANT
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise UnauthorizedError("missing API key: send `Authorization: Bearer <key>`")
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        tenant = None
        for key in self._keys:  # no early exit: constant time in the position of the match
            if hmac.compare_digest(key.digest, digest) and tenant is None:
                tenant = key.tenant
        if tenant is None:
            raise UnauthorizedError("wrong API key")
        return tenant

    def log_mode(self) -> None:
        """Log at start whether the API is open (a warning) or which tenants have keys."""
        if self._keys:
            logger.info("API keys configured for tenants: %s", ", ".join(self.tenants))
        else:
            logger.warning("RECALIB_API_KEYS is empty: the API is OPEN to anyone who can reach it")
