"""What a failure of the object store means for recalib: missing, or the store's fault (503)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from recalib.errors import ServiceUnavailableError

T = TypeVar("T")

MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchUpload"})
AUTH_CODES = frozenset(
    {
        "403",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "RequestTimeTooSkewed",
        "AuthorizationHeaderMalformed",
    }
)


def error_code(exc: BaseException) -> str | None:
    """The S3 error code of a ``ClientError`` (``NoSuchKey``, ``403``...), else None."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "")) or None
    return None


def is_missing(exc: BaseException) -> bool:
    return error_code(exc) in MISSING_CODES


def none_if_missing(call: Callable[[], T]) -> T | None:
    """``call()``'s answer, or None when the store says the object it asks for is missing."""
    try:
        return call()
    except Exception as exc:
        if is_missing(exc):
            return None
        raise


def unavailable(exc: BaseException, store: str, who: str) -> ServiceUnavailableError | None:
    """The 503 error when ``exc`` is the store's fault (down, refuses the credentials, no such
    bucket, a 5xx), else None. The message never holds credentials (boto3's never do)."""
    fix = (
        f"check RECALIB_STORAGE_URL, RECALIB_S3_ENDPOINT_URL and the AWS credentials of the {who} "
        "(environment, profile or instance role)"
    )
    if isinstance(exc, ClientError):
        code = error_code(exc) or "?"
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in AUTH_CODES:
            reason = f"refuses the {who}'s credentials ({code})"
        elif code == "NoSuchBucket":
            reason = "has no such bucket (NoSuchBucket)"
        elif status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
            reason = f"fails ({code}, HTTP {status})"
        else:
            return None
    elif isinstance(exc, BotoCoreError):
        reason = f"does not answer ({type(exc).__name__}: {exc})"
    else:
        return None
    return ServiceUnavailableError(f"the object store {store} {reason}; {fix}", file=store)
