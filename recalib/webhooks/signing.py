"""Webhook secrets and signatures, per the Standard Webhooks specification.

``RECALIB_WEBHOOK_SECRETS`` holds comma-separated ``tenant:whsec_<base64 key>`` entries, ``*``
standing for any tenant without an entry of its own (as in ``RECALIB_API_KEYS``). A message is
signed as ``v1,<base64 HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>")>``, which
receivers check with the ``standardwebhooks`` library (``Webhook(secret).verify(body, headers)``).
Secrets are never logged, stored or echoed in an error message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence

from pydantic import SecretStr

from recalib.errors import InvalidOptionError

PREFIX = "whsec_"
ANY_TENANT = "*"
MIN_KEY_BYTES, MAX_KEY_BYTES = 24, 64
"""The key lengths the specification recommends."""
_TENANT_RE = re.compile(r"^([A-Za-z0-9_-]{1,64}|\*)$")
GENERATE_HINT = (
    'generate one with: python -c "import base64, secrets; '
    "print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\""
)


def _entry_error(index: int, what: str) -> InvalidOptionError:
    # The entry itself is never echoed: it holds a secret.
    return InvalidOptionError(
        f"RECALIB_WEBHOOK_SECRETS entry {index + 1} {what}; {GENERATE_HINT}",
        field="webhook_secrets",
    )


def _parse_key(secret: str, index: int) -> bytes:
    if not secret.startswith(PREFIX):
        raise _entry_error(index, f"is not `tenant:{PREFIX}<base64>`")
    try:
        key = base64.b64decode(secret[len(PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise _entry_error(index, f"has a secret that is not base64 after `{PREFIX}`") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise _entry_error(
            index, f"has a {len(key)}-byte key; use {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes"
        )
    return key


class WebhookSecrets:
    """The signing key of each tenant (``*``: of every tenant without its own)."""

    def __init__(self, entries: Sequence[SecretStr | str]) -> None:
        self._keys: dict[str, bytes] = {}
        for index, entry in enumerate(entries):
            text = entry.get_secret_value() if isinstance(entry, SecretStr) else entry
            tenant, sep, secret = text.strip().partition(":")
            if not sep or not _TENANT_RE.match(tenant):
                raise _entry_error(index, "is not `tenant:whsec_<base64>` (or `*:whsec_...`)")
            self._keys[tenant] = _parse_key(secret.strip(), index)

    def key_for(self, tenant: str) -> bytes | None:
        """The key that signs ``tenant``'s webhooks, or None when it has none."""
        return self._keys.get(tenant, self._keys.get(ANY_TENANT))

    def require(self, tenant: str, *, field: str = "webhook") -> bytes:
        """The key of ``tenant``; :class:`InvalidOptionError` naming ``field`` when it has none."""
        key = self.key_for(tenant)
        if key is None:
            raise InvalidOptionError(
                f"{field}: this server has no webhook signing secret for tenant {tenant!r}; the "
                "operator adds `tenant:whsec_...` (or `*:whsec_...`) to RECALIB_WEBHOOK_SECRETS",
                field=field,
            )
        return key


def sign(key: bytes, message_id: str, timestamp_s: int, body: bytes) -> str:
    """The ``webhook-signature`` header value of one message."""
    signed = f"{message_id}.{timestamp_s}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()
