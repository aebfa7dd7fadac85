"""Job options: what a client chooses for one recalibration (engine, evaluation, outputs).

``JobSpec`` is what the runner executes: the options plus local paths and the operator's limits.
"""

from __future__ import annotations

import math
import re
import warnings
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, PlainValidator, field_validator, model_validator

from recalib import defaults
from recalib.contract.base import Input, JsonObject

INT64_MAX = 2**63 - 1
"""Upper bound of unbounded integer options (they must fit every store and library)."""


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


class Task(StrEnum):
    """What the evaluation measures; recalibration itself is the same for every task.

    - ``auto``: decided from the model's output and the labels (the report says what and why).
    - ``classification``: (N, classes) logits, labels one class id per sample.
    - ``segmentation``: (N, classes, H, W) logits, labels N×H×W masks of class ids.
    - ``none``: label-free measures only, for any output (detection, embeddings, several heads).
    """

    auto = "auto"
    classification = "classification"
    segmentation = "segmentation"
    none = "none"


class JobKind(StrEnum):
    """What a job does with the model.

    - ``recalibrate``: re-estimate the BN statistics, evaluate before/after, write the model.
    - ``drift``: one forward pass in eval mode that changes nothing: how far the data's BN
      inputs are from the stored statistics, and whether recalibrating is recommended
      (``report.drift``); no checkpoint is written.
    """

    recalibrate = "recalibrate"
    drift = "drift"


def _prior_strength(value: object) -> float | str:
    """``"auto"``, or a finite number ≥ 0 (a numeric string too: the command line's)."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("give a number >= 0 or 'auto'")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"give a number >= 0 or 'auto', got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"give a finite number >= 0 or 'auto', got {value!r}")
    return number


PriorStrength = Annotated[
    float | Literal["auto"],
    PlainValidator(
        _prior_strength, json_schema_input_type=Annotated[float, Field(ge=0)] | Literal["auto"]
    ),
]
"""N of Schneider et al. 2020, or ``"auto"``: one validator, so an error names the field alone
(a union would add its member to the error's location)."""


INPUT_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
"""An input name: a tensor file's array name and the forward argument it feeds."""
MAX_INPUT_NAMES = 32


class Preprocess(Input):
    """Image preprocessing for image archives (ignored for tensor files).

    Order: decode (Pillow) → convert to ``mode`` → resize shorter side → center crop → to float in
    [0, 1] → normalize with ``mean``/``std`` per channel.
    """

    mode: Literal["RGB", "L"] = Field("RGB", description="Pillow mode: RGB (3 ch) or L (1 ch).")
    resize: int | None = Field(None, ge=1, le=8192, description="Shorter side, pixels.")
    center_crop: int | None = Field(None, ge=1, le=8192, description="Square crop side, pixels.")
    mean: list[float] | None = Field(
        None, max_length=3, description="Per-channel mean; default none (0)."
    )
    std: list[float] | None = Field(
        None, max_length=3, description="Per-channel std; default none (1)."
    )

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


MLFLOW_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$"
MLFLOW_ALIAS_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]{0,62}$"


class Register(Input):
    """Register the recalibrated model in the MLflow Model Registry of
    ``RECALIB_MLFLOW_TRACKING_URI`` as a new version of ``name``; ``alias`` moves to it only when
    the verdict is not ``worse``.

    On the command line: ``--register NAME`` or ``--register NAME@ALIAS``.
    """

    name: str = Field(max_length=128, pattern=MLFLOW_NAME_PATTERN, examples=["digits-cnn"])
    alias: str | None = Field(
        None, max_length=63, pattern=MLFLOW_ALIAS_PATTERN, examples=["production"]
    )

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        if isinstance(value, str):  # "name" or "name@alias" (the CLI flag)
            name, sep, alias = value.partition("@")
            return {"name": name, "alias": alias} if sep else {"name": name}
        return value

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, alias: str | None) -> str | None:
        if alias is not None and (alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias)):
            raise ValueError(f"alias {alias!r} is reserved by MLflow (latest, v<number>)")
        return alias


# `register` is the option's name in the API and the CLI; pydantic warns that it shadows
# ABCMeta.register of the model *class* (instances are unaffected). Only that warning is muted.
warnings.filterwarnings(
    "ignore", message='Field name "register" in "JobOptions" shadows', category=UserWarning
)


class JobOptions(Input):
    """Options of one recalibration: the engine's, the evaluation's and the outputs'."""

    estimator: Estimator = Estimator.population
    batch_size: int = Field(
        defaults.BATCH_SIZE, ge=1, le=65536, description="Calibration batch size, samples."
    )
    max_samples: int | None = Field(
        None,
        ge=2,
        le=INT64_MAX,
        description="Use at most this many calibration samples (seeded subsample).",
    )
    seed: int = Field(
        0, ge=0, le=INT64_MAX, description="Seed for order, subsampling and the holdout split."
    )
    device: str = Field(
        "auto",
        max_length=32,
        pattern=defaults.DEVICE_PATTERN,
        description="auto = CUDA if available, else CPU.",
    )
    momentum: float = Field(
        defaults.MOMENTUM, gt=0, le=1, description="EMA momentum (estimator=ema only)."
    )
    prior_strength: PriorStrength = Field(
        0.0,
        description=(
            "N of Schneider et al. 2020: new = N/(N+n)·source + n/(N+n)·target, n = calibration "
            "samples. 0 = pure target statistics; `auto` = an N per BN layer chosen from the "
            "data (the MSE-optimal weight between source and target estimates; "
            "`report.calibration.prior` says which)."
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
    tolerance_window: int = Field(
        defaults.TOLERANCE_WINDOW, ge=1, le=1000, description="Batches, for `tolerance`."
    )
    holdout: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=(
            "Fraction of labeled calibration data held out for evaluation when no eval file is "
            "given (default 0.5, `defaults.HOLDOUT`, in that case)."
        ),
    )
    fold: bool = Field(False, description="Also write a copy with BN folded into conv/linear.")
    export: list[Literal["onnx"]] = Field(
        [],
        max_length=1,
        description=(
            "Also write the recalibrated model in these formats: `onnx` writes "
            "`<stem>.recalibrated.onnx` (torch.onnx, BN kept, dynamic batch), checked against "
            "the torch model on an evaluation batch (`defaults.ONNX_EXPORT_TOLERANCE`). For "
            "torch inputs."
        ),
    )
    channels_last: bool = Field(False, description="Use channels_last memory format (4-D input).")
    autocast: Literal["off", "bf16", "fp16"] = Field(
        "off", description="Autocast dtype for forward passes (statistics stay float32)."
    )
    eval_batch_size: int = Field(
        defaults.EVAL_BATCH_SIZE, ge=1, le=65536, description="Evaluation batch size."
    )
    preprocess: Preprocess | None = Field(None, description="For image archives.")
    task: Task = Field(Task.auto, description="What the evaluation measures (auto: decided).")
    output_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description=(
            "Where the logits are in a structured output: a dict key, a tuple index or a "
            "named-tuple field (dotted for nested outputs, e.g. `aux.0`)."
        ),
    )
    input_names: list[Annotated[str, Field(max_length=64, pattern=INPUT_NAME_PATTERN)]] = Field(
        ["inputs"],
        min_length=1,
        max_length=MAX_INPUT_NAMES,
        description=(
            "Arrays of a tensor file fed to the model: one is passed positionally, several by "
            "keyword (a .pt2 program: in this order)."
        ),
    )
    ignore_index: int = Field(
        255,
        ge=-(2**31),
        lt=2**31,
        description="Segmentation: the mask value of pixels left out of every metric.",
    )

    drift_threshold: float = Field(
        defaults.DRIFT_THRESHOLD,
        gt=0,
        le=1e6,
        description=(
            "Drift jobs: the drift score (mean symmetric KL per BN channel, nats) above which "
            "recalibration is recommended."
        ),
    )

    register: Register | None = Field(
        None,
        description=(
            "Register the recalibrated model in the MLflow Model Registry as a new version of "
            "`name` (tags: source, data sha256, estimator, metrics, verdict); `alias` moves to it "
            "unless the verdict is `worse`. Flag: `NAME` or `NAME@ALIAS`."
        ),
    )

    @field_validator("input_names")
    @classmethod
    def _check_input_names(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"input names must be distinct, got {names}")
        if "labels" in names:
            raise ValueError("'labels' is the array of labels, not an input")
        return names


def check_kind(kind: JobKind, options: JobOptions) -> None:
    """Options that make no sense for ``kind``: a drift job writes no model to fold or register.

    Raises:
        ValueError: naming the option.
    """
    if kind == JobKind.drift:
        for name, given in (("register", options.register is not None), ("fold", options.fold)):
            if given:
                raise ValueError(
                    f"a drift job writes no model: options.{name} needs kind recalibrate"
                )


class JobSpec(Input):
    """Everything the job runner needs, with local paths. Built by the CLI or the queue task."""

    kind: JobKind = JobKind.recalibrate
    model_path: str
    calibration_path: str
    eval_path: str | None = None
    source_eval_path: str | None = Field(
        None,
        description="Labeled data from the model's training domain, for the label-free "
        "estimate of the target top-1.",
    )
    arch: str | None = Field(None, description="`module:callable` for state_dict models.")
    arch_kwargs: JsonObject = Field(default_factory=dict)
    options: JobOptions = Field(default_factory=JobOptions)
    out_dir: str
    model_source: str | None = Field(
        None,
        description="Where the model came from (`models:/name/version`), for the registry's tags.",
    )
    allow_unsafe_pickle: bool = False
    vet_models: bool = Field(
        True, description="Apply the .pt2/TorchScript operator and name allowlists (a setting)."
    )
    arch_allowlist: list[str] = Field(default_factory=lambda: list(defaults.ARCH_ALLOWLIST))
    # Archive safety limits (settings in the service; defaults for the CLI).
    max_archive_members: int = defaults.MAX_ARCHIVE_MEMBERS
    max_archive_bytes: int = defaults.MAX_ARCHIVE_BYTES
    max_image_pixels: int = defaults.MAX_IMAGE_PIXELS

    @model_validator(mode="after")
    def _options_fit_kind(self) -> JobSpec:
        check_kind(self.kind, self.options)
        return self
