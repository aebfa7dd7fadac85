"""The contract between API, queue, worker and CLI: one set of pydantic models all of them import.

The same models serve the OpenAPI schema, the queue payload and ``report.json``. Inputs forbid
extra fields, so a misspelt option fails loudly instead of being ignored. Units are in the names
(``_s`` seconds, ``_bytes`` bytes); accuracies are fractions in [0, 1].

Naming follows the FastAPI template: ``XCreate`` is what a client sends, ``XPublic`` what it gets
back, ``XRecord`` what is stored.

This module is torch-free: the API imports it.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

REPORT_SCHEMA_VERSION = 1

T = TypeVar("T")


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Output(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------------------------
# Engine options
# --------------------------------------------------------------------------------------------


class Estimator(StrEnum):
    """How per-layer statistics are aggregated over calibration batches.

    - ``population``: pooled mean/variance of all activations, batches weighted by element count
      (fvcore PreciseBN); small or partial batches cannot skew it. The default.
    - ``batch_mean``: reset, then ``momentum=None`` (equal weight per batch): exactly torch's
      ``swa_utils.update_bn``.
    - ``ema``: keep the existing statistics and update them with ``momentum`` per batch, no reset.
    """

    population = "population"
    batch_mean = "batch_mean"
    ema = "ema"


class Preprocess(_Input):
    """Image preprocessing for image archives (ignored for tensor files).

    Order: decode (Pillow) → convert to ``mode`` → resize shorter side → center crop → to float in
    [0, 1] → normalize with ``mean``/``std`` per channel.
    """

    mode: Literal["RGB", "L"] = Field("RGB", description="Pillow mode: RGB (3 ch) or L (1 ch).")
    resize: int | None = Field(None, ge=1, le=8192, description="Shorter side, pixels.")
    center_crop: int | None = Field(None, ge=1, le=8192, description="Square crop side, pixels.")
    mean: list[float] | None = Field(None, description="Per-channel mean; default none (0).")
    std: list[float] | None = Field(None, description="Per-channel std; default none (1).")

    @model_validator(mode="after")
    def _check_channels(self) -> Preprocess:
        channels = 3 if self.mode == "RGB" else 1
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) not in (1, channels):
                raise ValueError(f"{name} needs 1 or {channels} values for mode {self.mode}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class JobOptions(_Input):
    """Options of one recalibration: the engine's, the evaluation's and the outputs'."""

    estimator: Estimator = Estimator.population
    batch_size: int = Field(64, ge=1, le=65536, description="Calibration batch size, samples.")
    max_samples: int | None = Field(
        None, ge=2, description="Use at most this many calibration samples (seeded subsample)."
    )
    seed: int = Field(0, ge=0, description="Seed for order, subsampling and the holdout split.")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
        description="auto = CUDA if available, else CPU.",
    )
    momentum: float = Field(0.1, gt=0, le=1, description="EMA momentum (estimator=ema only).")
    prior_strength: float = Field(
        0.0,
        ge=0,
        description=(
            "N of Schneider et al. 2020: new = N/(N+n)·source + n/(N+n)·target, n = calibration "
            "samples. 0 = pure target statistics."
        ),
    )
    tolerance: float | None = Field(
        None,
        gt=0,
        description=(
            "Early stop: stop once every layer's statistics move less than this (relative to "
            "their running std) over `tolerance_window` batches."
        ),
    )
    tolerance_window: int = Field(5, ge=1, le=1000, description="Batches, for `tolerance`.")
    holdout: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=(
            "Fraction of labeled calibration data held out for evaluation when no eval file is "
            "given (default 0.5 in that case)."
        ),
    )
    fold: bool = Field(False, description="Also write a copy with BN folded into conv/linear.")
    channels_last: bool = Field(False, description="Use channels_last memory format (4-D input).")
    autocast: Literal["off", "bf16", "fp16"] = Field(
        "off", description="Autocast dtype for forward passes (statistics stay float32)."
    )
    eval_batch_size: int = Field(256, ge=1, le=65536, description="Evaluation batch size.")
    preprocess: Preprocess | None = Field(None, description="For image archives.")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


class Verdict(StrEnum):
    better = "better"
    worse = "worse"
    unchanged = "unchanged"
    unknown = "unknown"


class Metrics(_Output):
    """Model quality on one data set. Accuracies are fractions in [0, 1]; null without labels."""

    top1: float | None
    top5: float | None = Field(description="Null without labels or with fewer than 5 classes.")
    loss: float | None = Field(description="Mean cross-entropy, nats; null without labels.")
    samples: int
    mean_entropy: float = Field(description="Mean predictive entropy, nats.")
    mean_confidence: float = Field(description="Mean max-softmax probability.")


class LayerChange(_Output):
    """How one BN layer's running statistics moved."""

    name: str
    type: str
    channels: int
    mean_shift_std: float = Field(
        description="RMS over channels of (new mean − old mean) / old running std."
    )
    var_ratio: float = Field(description="Geometric mean over channels of new var / old var.")


class SkippedLayer(_Output):
    name: str
    type: str
    reason: str


class CalibrationSummary(_Output):
    samples: int = Field(description="Calibration samples actually forwarded.")
    batches: int
    available_samples: int = Field(description="Calibration samples available after any split.")
    stopped_early: bool = False
    estimator: Estimator
    merged_batches: int = Field(
        0, description="Batches merged into the next because they were too small for train-mode BN."
    )


class DataSplit(_Output):
    """Which samples served what: indices into the files, in file order."""

    calibration_file: str
    eval_file: str | None
    holdout_fraction: float | None = None
    calibration_indices: list[int] | None = Field(
        None, description="Indices of calibration-file samples used to calibrate (holdout only)."
    )
    eval_indices: list[int] | None = Field(
        None, description="Indices of calibration-file samples used to evaluate (holdout only)."
    )
    evaluated_on: Literal["eval_file", "holdout", "calibration"] | None = Field(
        None,
        description=(
            "What `before`/`after` were measured on: the eval file, a held-out part of labeled "
            "calibration data, or (unlabeled calibration data, no eval file) the calibration "
            "samples themselves, label-free metrics only."
        ),
    )
    skipped_entries: int = Field(0, description="Archive entries skipped (not images, corrupt).")
    skipped_examples: list[str] = Field(default_factory=list, description="Up to 20 of them.")


class Artifact(_Output):
    file: str = Field(description="File name, relative to the job's output directory.")
    format: Literal["pt2", "torchscript", "safetensors", "pt"]
    sha256: str
    bytes: int


class FoldReport(_Output):
    artifact: Artifact
    folded: int
    not_folded: list[SkippedLayer]
    max_abs_diff: float = Field(description="Largest |folded − unfolded| output over the data.")


class Report(_Output):
    """``report.json``: the result of one recalibration."""

    schema_version: int = REPORT_SCHEMA_VERSION
    recalib_version: str
    model_format: Literal["pt2", "torchscript", "safetensors", "pt", "module"]
    bn_layers: int = Field(description="BN layers recalibrated.")
    skipped_layers: list[SkippedLayer]
    calibration: CalibrationSummary
    before: Metrics | None = Field(description="Null when no evaluation data exists.")
    after: Metrics | None
    prediction_change: float | None = Field(
        description="Fraction of evaluated samples whose top-1 prediction changed."
    )
    verdict: Verdict
    layers: list[LayerChange]
    checkpoint: Artifact
    folded: FoldReport | None = None
    data: DataSplit
    options: JobOptions
    device: str
    timings_s: dict[str, float]


# --------------------------------------------------------------------------------------------
# Job execution (what the worker and `recalib run` execute)
# --------------------------------------------------------------------------------------------


class JobSpec(_Input):
    """Everything the job runner needs, with local paths. Built by the CLI or the queue task."""

    model_path: str
    calibration_path: str
    eval_path: str | None = None
    arch: str | None = Field(None, description="`module:callable` for state_dict models.")
    arch_kwargs: dict[str, object] = Field(default_factory=dict)
    options: JobOptions = Field(default_factory=JobOptions)
    out_dir: str
    allow_unsafe_pickle: bool = False
    arch_allowlist: list[str] = Field(default_factory=lambda: ["torchvision.models", "timm"])
    # Archive safety limits (settings in the service; defaults for the CLI).
    max_archive_members: int = 100_000
    max_archive_bytes: int = 8 * 1024**3
    max_image_pixels: int = 50_000_000


class Phase(StrEnum):
    queued = "queued"
    loading = "loading"
    recalibrating = "recalibrating"
    evaluating = "evaluating"
    saving = "saving"
    done = "done"


class Progress(_Output):
    phase: Phase = Phase.queued
    done: int = 0
    total: int | None = None


# --------------------------------------------------------------------------------------------
# REST API
# --------------------------------------------------------------------------------------------


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


FileId = Annotated[str, Field(pattern=r"^f_[A-Za-z0-9_-]{16,64}$", examples=["f_3kq0cV2m9xLr8tQw"])]
JobId = Annotated[str, Field(pattern=r"^j_[A-Za-z0-9_-]{16,64}$", examples=["j_Zx81bQe0LsP3mNaa"])]


class FilePublic(_Output):
    id: str
    filename: str
    bytes: int
    sha256: str
    created_at: datetime


class FileRecord(FilePublic):
    """Stored metadata of an uploaded file (the content lies in the data directory)."""

    tenant: str


class JobCreate(_Input):
    """``POST /v1/jobs`` body."""

    model_file: FileId
    calibration_file: FileId
    eval_file: FileId | None = None
    arch: str | None = Field(
        None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", examples=["torchvision.models:resnet18"]
    )
    arch_kwargs: dict[str, object] = Field(default_factory=dict)
    options: JobOptions = Field(default_factory=JobOptions)


class JobError(_Output):
    type: str = Field(description="Problem type slug, e.g. `no-batchnorm`, `internal-error`.")
    message: str


class JobPublic(_Output):
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


class Page(_Output, Generic[T]):
    """A page of a listing, newest first; pass ``next_cursor`` as ``cursor`` for the next one."""

    items: list[T]
    next_cursor: str | None = None


class JobEvent(_Output):
    """One progress event of a job, in order."""

    seq: int
    at: datetime
    status: JobStatus
    progress: Progress
    message: str | None = None


class Problem(_Output):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    field: str | None = None
    file: str | None = None


class WorkerInfo(_Output):
    name: str
    device: str
    state: str
    current_job: str | None = None
    last_heartbeat: datetime | None = None


class Readiness(_Output):
    ready: bool
    redis: bool
    storage_writable: bool
    workers: list[WorkerInfo]
    detail: str | None = None
