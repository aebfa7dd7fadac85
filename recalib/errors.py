"""The one error hierarchy of recalib.

Every failure a user can cause is a :class:`UserError` subclass whose message names the file or
field at fault and, where there is one, the fix. Everything else is an :class:`InternalError` (or an
unexpected exception, treated the same way). The mapping to HTTP status codes (``http_status``), to
RFC 9457 problem types (``type_slug``) and to CLI exit codes (``exit_code``) lives here, once:
the service, the CLI and the worker all read it from the exception class.

This module is torch-free: the API imports it.
"""

from __future__ import annotations

from typing import ClassVar

# CLI exit codes (documented in the README, "Using recalib from a pipeline").
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER_ERROR = 2
EXIT_WORSE = 3
EXIT_JOB_FAILED = 4
EXIT_CANCELLED = 5
EXIT_DRIFTED = 6
"""``recalib drift --fail-if-drifted``: the drift check recommends recalibrating."""


class RecalibError(Exception):
    """Base of every error recalib raises on purpose.

    Args:
        message: one sentence a user can act on.
        field: the request field or option at fault (``"options.batch_size"``), if any.
        file: the file at fault (a path or a file id), if any.
    """

    type_slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = EXIT_INTERNAL

    def __init__(self, message: str, *, field: str | None = None, file: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.file = file

    def __str__(self) -> str:
        return self.message


class InternalError(RecalibError):
    """A fault of recalib or its environment, not of the user's input."""


class UserError(RecalibError, ValueError):
    """Bad input from the user: a file, an option or a request that cannot be honoured."""

    type_slug = "invalid-input"
    title = "Invalid input"
    http_status = 422
    exit_code = EXIT_USER_ERROR


class InvalidOptionError(UserError):
    """An option or request field has a value that cannot be used."""

    type_slug = "invalid-option"
    title = "Invalid option"


class InvalidModelError(UserError):
    """The model file cannot be loaded, or the model cannot be recalibrated as it is."""

    type_slug = "invalid-model"
    title = "Invalid model"


class NoBatchNormError(InvalidModelError):
    """The model has no BatchNorm layer whose statistics could be re-estimated."""

    type_slug = "no-batchnorm"
    title = "Model has no BatchNorm layers"


class StatisticsUnchangedError(InvalidModelError):
    """Recalibration ran but no BN statistic moved (e.g. a traced model with training baked in)."""

    type_slug = "statistics-unchanged"
    title = "Statistics did not change"


class UnsafePickleError(UserError):
    """Loading would unpickle a file (arbitrary code can run) and the caller did not opt in."""

    type_slug = "unsafe-pickle"
    title = "Unsafe pickle refused"


class ArchitectureNotAllowedError(UserError):
    """The architecture ``module:callable`` lies outside the operator's allowlist."""

    type_slug = "architecture-not-allowed"
    title = "Architecture not allowed"
    http_status = 403


class InvalidDataError(UserError):
    """A data file is malformed, has the wrong shape/dtype, non-finite values or bad labels."""

    type_slug = "invalid-data"
    title = "Invalid data"


class ArchiveRejectedError(InvalidDataError):
    """An archive breaks a safety limit (expansion ratio, member count, path traversal)."""

    type_slug = "archive-rejected"
    title = "Archive rejected"


class NotFoundError(UserError):
    """A file, job or artifact does not exist (or belongs to another tenant)."""

    type_slug = "not-found"
    title = "Not found"
    http_status = 404


class ConflictError(UserError):
    """The request conflicts with the current state (e.g. an artifact of an unfinished job)."""

    type_slug = "conflict"
    title = "Conflict"
    http_status = 409


class IdempotencyKeyReusedError(UserError):
    """The same ``Idempotency-Key`` was sent with a different request body."""

    type_slug = "idempotency-key-reused"
    title = "Idempotency key reused with another body"
    http_status = 422


class PayloadTooLargeError(UserError):
    """An upload is larger than ``RECALIB_MAX_UPLOAD_BYTES``."""

    type_slug = "payload-too-large"
    title = "Payload too large"
    http_status = 413


class UnauthorizedError(UserError):
    """The API key is missing or wrong."""

    type_slug = "unauthorized"
    title = "Unauthorized"
    http_status = 401


class OutboundNotAllowedError(UserError):
    """A URL (input URI, webhook) names a host recalib must not contact (SSRF protection)."""

    type_slug = "outbound-not-allowed"
    title = "Outbound address not allowed"


class JobCancelledError(RecalibError):
    """The job was cancelled while it ran."""

    type_slug = "cancelled"
    title = "Job cancelled"
    http_status = 409
    exit_code = EXIT_CANCELLED


class ServiceUnavailableError(RecalibError):
    """A backing service (Redis, the data directory) is down or not writable."""

    type_slug = "service-unavailable"
    title = "Service unavailable"
    http_status = 503


def error_type_name(exc: BaseException) -> str:
    """The ``type`` recorded for a failed job: the slug for our errors, ``internal-error`` else."""
    return exc.type_slug if isinstance(exc, RecalibError) else InternalError.type_slug
