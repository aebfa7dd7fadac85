"""REST resources: files, jobs, their progress and events, problems, workers, readiness.

Named as in the FastAPI template: ``XCreate`` is what a client sends, ``XPublic`` what it gets
back, ``XRecord`` what is stored (the public model plus bookkeeping; ``response_model`` filters).
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Generic, Self, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, model_validator

from recalib.contract.base import Input, JsonObject, Output
from recalib.contract.options import JobKind, JobOptions, check_kind
from recalib.contract.report import Report
from recalib.contract.webhooks import Webhook
from recalib.ids import FILE_ID_PATTERN, JOB_ID_PATTERN

T = TypeVar("T")


class Phase(StrEnum):
    queued = "queued"
    loading = "loading"
    recalibrating = "recalibrating"
    evaluating = "evaluating"
    saving = "saving"
    done = "done"


class Progress(Output):
    phase: Phase = Phase.queued
    done: int = 0
    total: int | None = None


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


FileId = Annotated[str, Field(pattern=FILE_ID_PATTERN, examples=["f_3kq0cV2m9xLr8tQw"])]

INPUT_URI_SCHEMES = ("s3", "https", "models")
"""Schemes of ``*_uri`` inputs (the worker's fetchers: :mod:`recalib.inputs.uri_fetch`)."""


_MODELS_URI_RE = re.compile(r"^models:/[^/@]+(/\d+|@[A-Za-z0-9_-]+)$")


def _input_uri(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme == "models":  # MLflow's registry: models:/<name>/<version> or @<alias>
        if not _MODELS_URI_RE.match(value):
            raise ValueError(
                f"{value[:100]!r} is not models:/<name>/<version> or models:/<name>@<alias>"
            )
        return value
    if parts.scheme not in INPUT_URI_SCHEMES or not parts.netloc or not parts.path.strip("/"):
        schemes = ", ".join(f"{s}://" for s in INPUT_URI_SCHEMES)
        raise ValueError(f"{value[:100]!r} is not a URI of an object ({schemes})")
    if parts.username or parts.password:
        raise ValueError("credentials do not belong in a URI: the worker's own are used")
    return value


InputUri = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2048,
        examples=["s3://models/resnet18.pt2", "https://example.com/data/calib.npz"],
    ),
    AfterValidator(_input_uri),
]
JobId = Annotated[str, Field(pattern=JOB_ID_PATTERN, examples=["j_Zx81bQe0LsP3mNaa"])]


class FilePublic(Output):
    id: str
    filename: str
    bytes: int
    sha256: str
    created_at: datetime


class FileRecord(FilePublic):
    """Stored metadata of an uploaded file (the content lies in the data directory)."""

    tenant: str


class JobCreate(Input):
    """``POST /v1/jobs`` body."""

    kind: JobKind = Field(
        JobKind.recalibrate,
        description=(
            "`recalibrate` (default), or `drift`: measure how far the calibration data is from "
            "the model's BN statistics and recommend recalibrating or not; changes nothing."
        ),
    )
    model_file: FileId | None = Field(None, description="An uploaded file; or `model_uri`.")
    calibration_file: FileId | None = Field(
        None, description="An uploaded file; or `calibration_uri`."
    )
    eval_file: FileId | None = None
    model_uri: InputUri | None = Field(
        None,
        description=(
            "The model by URI instead of upload: `s3://bucket/key` (read with the worker's "
            "credentials) or `https://`; fetched by the worker under RECALIB_MAX_UPLOAD_BYTES."
        ),
    )
    calibration_uri: InputUri | None = Field(None, description="Calibration data by URI.")
    eval_uri: InputUri | None = Field(None, description="Evaluation data by URI.")
    source_eval_file: FileId | None = Field(
        None,
        description="Labeled data from the model's training (source) domain: without target "
        "labels, the label-free estimate of the target top-1 and its verdict come from it "
        "(`report.estimate`).",
    )
    source_eval_uri: InputUri | None = Field(None, description="Source evaluation data by URI.")
    arch: str | None = Field(
        None,
        max_length=256,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        examples=["torchvision.models:resnet18"],
    )
    arch_kwargs: JsonObject = Field(
        default_factory=dict,
        description=(
            "Keyword arguments of `arch`: plain JSON with finite numbers, at most 64 KiB and 32 "
            "levels deep."
        ),
    )
    options: JobOptions = Field(default_factory=JobOptions)

    @model_validator(mode="after")
    def _one_source_each(self) -> Self:
        roles = (("model", True), ("calibration", True), ("eval", False), ("source_eval", False))
        for role, required in roles:
            given = [
                f"{role}_{kind}" for kind in ("file", "uri") if getattr(self, f"{role}_{kind}")
            ]
            if len(given) > 1:
                raise ValueError(f"give {role}_file or {role}_uri, not both")
            if required and not given:
                raise ValueError(f"{role}_file (an upload) or {role}_uri is required")
        check_kind(self.kind, self.options)
        return self

    webhook: Webhook | None = Field(
        None, description="Send the job's events to this URL, signed (Standard Webhooks)."
    )


class JobError(Output):
    type: str = Field(description="Problem type slug, e.g. `no-batchnorm`, `internal-error`.")
    message: str


class JobPublic(Output):
    """What ``GET /v1/jobs/{id}`` returns."""

    id: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    progress: Progress = Field(default_factory=Progress)
    request: JobCreate
    result: Report | None = None
    error: JobError | None = None


class JobRecord(JobPublic):
    """Our own job record in Redis (not RQ's internal status)."""

    tenant: str
    idempotency_key: str | None = None
    request_sha256: str | None = None
    worker: str | None = None
    output_attempt: int | None = Field(
        None, description="The run whose artifacts are the job's (set when it succeeded)."
    )


class Page(Output, Generic[T]):
    """A page of a listing, newest first; pass ``next_cursor`` as ``cursor`` for the next one."""

    items: list[T]
    next_cursor: str | None = None


class JobEvent(Output):
    """One progress event of a job, in order."""

    seq: int
    at: datetime
    status: JobStatus
    progress: Progress
    message: str | None = None


class Problem(Output):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    field: str | None = None
    file: str | None = None


class WorkerInfo(Output):
    name: str
    device: str
    state: str
    current_job: str | None = None
    last_heartbeat: datetime | None = None
    sandbox: str | None = Field(
        None,
        description="The sandbox its jobs run in, e.g. `strict (landlock-abi7, seccomp, netns)`.",
    )


class Readiness(Output):
    ready: bool
    redis: bool
    storage_writable: bool
    workers: list[WorkerInfo]
    detail: str | None = None
