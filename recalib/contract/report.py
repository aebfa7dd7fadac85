"""``report.json``: the result of one recalibration. Accuracies are fractions in [0, 1]."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from recalib.contract.base import Output
from recalib.contract.options import Estimator, JobKind, JobOptions

REPORT_SCHEMA_VERSION = 1


class Verdict(StrEnum):
    better = "better"
    worse = "worse"
    unchanged = "unchanged"
    inconclusive = "inconclusive"
    unknown = "unknown"


class Interval(Output):
    """A 95 % confidence interval, in the unit of the quantity it bounds."""

    low: float
    high: float


class Significance(Output):
    """The paired test behind a labeled verdict (:mod:`recalib.verdict`), after − before."""

    test: Literal["mcnemar_exact", "paired_bootstrap"] = Field(
        description="Exact McNemar test on the samples whose top-1 correctness changed "
        "(classification), or a paired bootstrap over images of the mean IoU (segmentation)."
    )
    p_value: float | None = Field(description="Two-sided p-value of no difference.")
    alpha: float = Field(description="Significance level of `better`/`worse`.")
    difference: float = Field(description="after − before: top-1 or mean IoU.")
    difference_interval: Interval = Field(description="95 % interval of `difference`.")
    tolerance: float = Field(
        description="`unchanged` when `difference_interval` lies within ±tolerance."
    )
    samples: int = Field(description="Paired samples (images) the test used.")
    samples_needed: int | None = Field(
        None,
        description="Labeled samples that would detect the observed difference at `alpha` with "
        "power 0.8; null when the difference is zero.",
    )
    only_before_correct: int | None = Field(
        None, description="McNemar: samples right before and wrong after."
    )
    only_after_correct: int | None = Field(
        None, description="McNemar: samples wrong before and right after."
    )


class EstimatedTop1(Output):
    """A label-free estimate of one model's top-1 on the target (``report.estimate``)."""

    top1: float | None = Field(description="The estimate; null when it is unreliable.")
    interval: Interval = Field(
        description="95 % interval; for an unreliable estimate [0, upper_bound]."
    )
    reliable: bool = Field(
        description="False when the evidence cannot support a number (the model is out of its "
        "training distribution): then only `upper_bound` holds."
    )
    upper_bound: float = Field(
        description="1 − TV(predicted class frequencies, source label frequencies): top-1 cannot "
        "exceed it when the target's class frequencies are the source's."
    )
    reason: str


class Estimate(Output):
    """Label-free estimates from a labeled source validation set (``source_eval_file``)."""

    method: str = Field(description="`atc-ne+class-bound` (see docs/label_free.md).")
    source_top1: float = Field(description="The original model's top-1 on the source set.")
    source_samples: int
    before: EstimatedTop1
    after: EstimatedTop1


class ConfidenceHistogram(Output):
    """How many samples had their max-softmax probability in each bin of [0, 1].

    ``bin_edges`` has one more entry than ``counts``; bins are ``[edge_i, edge_i+1)``, the last
    one closed (a confidence of exactly 1 falls in it).
    """

    bin_edges: list[float]
    counts: list[int]


class Metrics(Output):
    """Model quality on one data set. Accuracies are fractions in [0, 1]; null without labels.

    Classification fills ``top1``/``top5``/``per_class_accuracy``; segmentation
    ``pixel_accuracy``/``mean_iou``/``per_class_iou`` (its entropy, confidence and loss are per
    pixel); a model without logits (task ``none``) only ``samples``.
    """

    top1: float | None = Field(None, description="Classification; null without labels.")
    top1_interval: Interval | None = Field(
        None, description="95 % Wilson interval of `top1`; older reports lack it."
    )
    top5: float | None = Field(
        None, description="Null without labels, with fewer than 5 classes, or not classification."
    )
    loss: float | None = Field(
        None, description="Mean cross-entropy, nats (per labeled pixel for segmentation)."
    )
    samples: int
    mean_entropy: float | None = Field(
        None, description="Mean predictive entropy, nats (per pixel); null without logits."
    )
    mean_confidence: float | None = Field(
        None, description="Mean max-softmax probability (per pixel); null without logits."
    )
    per_class_accuracy: list[float | None] | None = Field(
        None,
        description=(
            "Top-1 accuracy of the samples of each class (index = label); null for a class with "
            "no samples, and null without labels."
        ),
    )
    confidence_histogram: ConfidenceHistogram | None = Field(
        None, description="Max-softmax probabilities of all samples (pixels), binned over [0, 1]."
    )
    pixel_accuracy: float | None = Field(
        None, description="Segmentation: correct / labeled pixels (ignore_index left out)."
    )
    mean_iou: float | None = Field(
        None,
        description="Segmentation: mean over classes of IoU, classes absent from labels and "
        "predictions left out.",
    )
    mean_iou_interval: Interval | None = Field(
        None,
        description="95 % bootstrap interval of `mean_iou` (images resampled, seeded); older "
        "reports lack it.",
    )
    per_class_iou: list[float | None] | None = Field(
        None,
        description="Segmentation: IoU per class id (index = class); null for a class absent "
        "from both labels and predictions.",
    )
    pixels: int | None = Field(None, description="Segmentation: labeled pixels evaluated.")


class TaskDecision(Output):
    """What the evaluation measured, and why (``task: auto`` decides from output and labels)."""

    task: Literal["classification", "segmentation", "none"]
    requested: Literal["auto", "classification", "segmentation", "none"]
    output_key: str | None = Field(
        None, description="Where the logits were taken from; null: the output itself or none."
    )
    output: str = Field(description="The model's output structure, e.g. `dict(out: 2×21×64×64)`.")
    reason: str


class OutputChange(Output):
    """How much the model's outputs moved, for any output structure (label-free)."""

    relative_l2: float | None = Field(
        description="‖after − before‖ / ‖before‖ over every floating output element of the "
        "evaluated samples; null when no output tensor kept its shape."
    )
    tensors: int = Field(description="Floating output tensors compared (per batch).")
    shape_changed: int = Field(
        0,
        description="Output tensors whose shape changed (a detector's number of boxes), left "
        "out of relative_l2.",
    )


class LayerChange(Output):
    """How one BN layer's running statistics moved."""

    name: str
    type: str
    channels: int
    mean_shift_std: float = Field(
        description="RMS over channels of (new mean − old mean) / old running std."
    )
    var_ratio: float = Field(description="Geometric mean over channels of new var / old var.")


class SkippedLayer(Output):
    name: str
    type: str
    reason: str


class PriorChoice(Output):
    """The prior strength N (Schneider et al. 2020) the new statistics were mixed with."""

    strength: float = Field(
        description="N asked for; with `auto` the median of the layers' N (1e12: source kept)."
    )
    chosen_by: Literal["fixed", "auto"] = Field(
        description="`fixed`: the option's number; `auto`: per layer from the data, the "
        "MSE-optimal weight w = estimation variance / (estimation variance + squared shift) of "
        "the source, N = n·w/(1 − w)."
    )
    per_layer: dict[str, float] | None = Field(None, description="`auto`: N by layer name.")


class Convergence(Output):
    """How much the estimates still moved over the last quarter of the calibration samples."""

    last_quarter_change: float | None = Field(
        description="Largest over layers of how far the estimates moved between 3/4 of the "
        "batches and the end: RMS over channels, in estimated stds (the larger of mean and std "
        "change). Small (≲ 0.05): more samples would change little."
    )
    samples_at_three_quarters: int
    per_layer: dict[str, float]


class CalibrationSummary(Output):
    samples: int = Field(description="Calibration samples actually forwarded.")
    batches: int
    available_samples: int = Field(description="Calibration samples available after any split.")
    stopped_early: bool = False
    estimator: Estimator
    merged_batches: int = Field(
        0, description="Batches merged into the next because they were too small for train-mode BN."
    )
    prior: PriorChoice | None = Field(
        None, description="The prior strength used; older reports and drift jobs lack it."
    )
    convergence: Convergence | None = Field(
        None,
        description="Stability of the estimates over the last quarter of the samples; null "
        "under 4 batches, after an early stop, and in older reports.",
    )


class InputSource(Output):
    """Where one input of the job came from, and exactly what it was."""

    role: Literal["model", "calibration", "eval", "source_eval"]
    file_id: str | None = Field(None, description="The upload, when the input was one.")
    uri: str | None = Field(None, description="The URI, when the input was given by one.")
    sha256: str
    bytes: int
    cached: bool = Field(
        False,
        description="Served from the worker's cache (an upload downloaded before, or a URI "
        "input whose source was unchanged).",
    )


class DataSplit(Output):
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
    sources: list[InputSource] = Field(
        default_factory=list,
        description="Each input's upload id or URI with its sha256 and size (older reports lack "
        "it).",
    )


class Artifact(Output):
    file: str = Field(description="File name, relative to the job's output directory.")
    format: Literal["pt2", "torchscript", "safetensors", "pt", "onnx"]
    sha256: str
    bytes: int


class ExportReport(Output):
    """A copy of the recalibrated model in another format (``options.export``)."""

    artifact: Artifact
    max_abs_diff: float = Field(
        description="Max |output difference| to the recalibrated torch model on an eval batch."
    )
    tolerance: float = Field(
        description="The largest difference accepted: ONNX_EXPORT_TOLERANCE × max(1, max |output|)."
    )


class FoldReport(Output):
    artifact: Artifact
    folded: int
    not_folded: list[SkippedLayer]
    max_abs_diff: float = Field(description="Largest |folded − unfolded| output over the data.")


class OomRetry(Output):
    """A pass that ran out of device memory and was run again with half the batch size."""

    step: str = Field(description="`evaluate_before`, `recalibrate`, `evaluate_after` or `fold`.")
    batch_size: int = Field(description="Samples per batch that ran out of memory.")
    retried_with: int = Field(description="Samples per batch of the next try.")


class Runtime(Output):
    """How the run used the machine: data loading against compute, memory retries."""

    data_workers: int = Field(
        description="DataLoader processes decoding the data (image archives); 0: in the run's "
        "own process."
    )
    pinned_memory: bool = Field(description="Batches were pinned for the copy to the GPU.")
    data_wait_s: float = Field(
        description="Seconds the evaluation and calibration passes waited for their next batch."
    )
    compute_s: float = Field(
        description="Seconds of those passes otherwise: forward passes and their bookkeeping."
    )
    data_bound: bool = Field(
        description="`data_wait_s > compute_s`: faster data loading would speed the run up more "
        "than a faster device."
    )
    oom_retries: list[OomRetry] = Field(
        default_factory=list,
        description="Passes that ran out of device memory and ran again with half the batch "
        "size (down to 2). `population` statistics do not depend on the batch size.",
    )


class RegisteredModel(Output):
    """The MLflow Model Registry version the recalibrated model became (``options.register``)."""

    name: str
    version: str
    run_id: str = Field(description="The MLflow run holding the artifacts and metrics.")
    alias: str | None = None
    alias_moved: bool = Field(
        False, description="The alias now names this version (never when the verdict is worse)."
    )


class SandboxUsed(Output):
    """Which sandbox ran the job's model (``RECALIB_SANDBOX``) and what enforced it."""

    level: Literal["strict", "basic", "off"]
    mechanisms: list[str] = Field(
        description="e.g. landlock-abi7, seccomp, netns; empty at level off."
    )


class DriftLayer(Output):
    """How far one BN layer's input on the target is from its stored statistics."""

    name: str
    type: str
    channels: int
    score: float = Field(
        description="Mean over channels of the symmetric KL divergence between the target's and "
        "the stored Gaussian (README, 'Should we recalibrate?'), less its sampling noise; nats."
    )
    max_channel_score: float = Field(description="The largest channel's divergence, nats.")
    noise: float = Field(
        description="Mean divergence that sampling noise alone would show with these samples "
        "(subtracted from `score`), nats."
    )
    mean_shift_std: float = Field(
        description="RMS over channels of (target mean − stored mean) / stored std."
    )
    var_ratio: float = Field(description="Geometric mean over channels of target / stored var.")


class DriftReport(Output):
    """A drift job's finding: should this model be recalibrated for this data?"""

    score: float = Field(description="Mean of the layers' scores, nats.")
    threshold: float = Field(description="`options.drift_threshold` the score was compared with.")
    recommend_recalibration: bool = Field(description="`score > threshold`.")
    samples: int = Field(description="Samples the drift pass read.")
    reliable: bool = Field(
        description="Enough samples for the score to be more than sampling noise (≥ 16)."
    )
    most_moved: list[str] = Field(description="The layers with the highest scores, highest first.")
    layers: list[DriftLayer] = Field(description="Every BN layer compared, in model order.")


class Report(Output):
    """``report.json``: the result of one recalibration."""

    schema_version: int = REPORT_SCHEMA_VERSION
    recalib_version: str
    kind: JobKind = Field(
        JobKind.recalibrate, description="What the job did; older reports lack it."
    )
    model_format: Literal["pt2", "torchscript", "safetensors", "pt", "module", "onnx"]
    bn_layers: int = Field(description="BN layers recalibrated.")
    skipped_layers: list[SkippedLayer]
    calibration: CalibrationSummary
    before: Metrics | None = Field(description="Null when no evaluation data exists.")
    after: Metrics | None
    prediction_change: float | None = Field(
        description="Fraction of evaluated samples (segmentation: pixels) whose top-1 "
        "prediction changed; null without logits."
    )
    verdict: Verdict = Field(
        description="`better`/`worse`: a significant change at `significance.alpha`; "
        "`unchanged`: the difference's interval within the tolerance; `inconclusive`: too few "
        "samples to tell; `unknown`: no labels and no estimate."
    )
    verdict_basis: Literal["labels", "estimate"] | None = Field(
        None,
        description="What the verdict rests on: labeled evaluation data, a label-free estimate, "
        "or nothing (`unknown`; older reports).",
    )
    significance: Significance | None = Field(
        None, description="The paired test of a labeled verdict; null otherwise."
    )
    estimate: Estimate | None = Field(
        None,
        description="Label-free target top-1 before and after, from a labeled source "
        "validation set; null without one.",
    )
    layers: list[LayerChange]
    checkpoint: Artifact | None = Field(
        description="The recalibrated model; null for a drift job, which writes none."
    )
    folded: FoldReport | None = None
    exports: list[ExportReport] = Field(
        default_factory=list, description="Copies in other formats (options.export)."
    )
    data: DataSplit
    options: JobOptions
    device: str
    timings_s: dict[str, float]
    task: TaskDecision | None = Field(
        None, description="What was evaluated; older reports lack it."
    )
    output_change: OutputChange | None = Field(
        None, description="Label-free evaluations (task none, or no labels): outputs' movement."
    )
    runtime: Runtime | None = Field(
        None,
        description="Data loading against compute, out-of-memory retries; older reports lack it.",
    )
    registered: RegisteredModel | None = Field(
        None, description="The MLflow model version registered (`options.register`)."
    )
    sandbox: SandboxUsed | None = Field(
        None, description="The sandbox the model ran in; set by the trusted worker."
    )
    drift: DriftReport | None = Field(
        None, description="A drift job's finding (`kind: drift`); null for a recalibration."
    )
