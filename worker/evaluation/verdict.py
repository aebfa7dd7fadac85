"""Before vs after on the same samples: prediction change, and the evidence for the verdict.

The verdict's rules and tests live in :mod:`recalib.verdict` (plain Python, shared with the CLI
and the service); this module hands them the paired evidence of two evaluations: per-sample top-1
correctness (classification, exact McNemar) or per-image class counts, resampled here with numpy
for the paired bootstrap of the mean IoU (segmentation). Also the bootstrap intervals of each
evaluation's mean IoU, from the same resamples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from recalib.contract import Interval, Metrics, Significance, Verdict
from recalib.verdict import (
    ALPHA,
    BOOTSTRAP_REPLICATES,
    BOOTSTRAP_SEED,
    MEAN_IOU_TOLERANCE,
    bootstrap_interval,
    paired_bootstrap,
    top1_from_counts,
)
from worker.evaluation.classification import Evaluation

__all__ = ["MEAN_IOU_TOLERANCE", "Judgement", "decide_verdict", "judge", "prediction_change"]


@dataclass
class Judgement:
    """The verdict of two evaluations and what it rests on; ``before``/``after`` are the metrics
    with their intervals filled in (mean IoU's from the bootstrap)."""

    verdict: Verdict
    basis: Literal["labels", "estimate"] | None
    significance: Significance | None
    before: Metrics | None
    after: Metrics | None


def prediction_change(before: torch.Tensor | None, after: torch.Tensor | None) -> float | None:
    """Fraction of samples (pixels) whose top-1 prediction differs between two passes over the
    same data; None without predictions (no logits)."""
    if before is None or after is None:
        return None
    if before.shape != after.shape:
        raise ValueError(f"prediction vectors differ in shape: {before.shape} vs {after.shape}")
    if before.numel() == 0:
        return 0.0
    return float((before != after).double().mean())


def judge(before: Evaluation, after: Evaluation, alpha: float = ALPHA) -> Judgement:
    """The labeled verdict of ``after`` against ``before`` (the same samples in the same order):
    McNemar on top-1 for classification, a paired bootstrap of the mean IoU for segmentation;
    ``unknown`` (basis None) without labels."""
    if before.image_counts is not None and after.image_counts is not None:
        return _judge_mean_iou(before, after, alpha)
    if before.correct is not None and after.correct is not None:
        if before.correct.shape != after.correct.shape:
            raise ValueError("before and after were evaluated on different samples")
        only_before = int((before.correct & ~after.correct).sum())
        only_after = int((after.correct & ~before.correct).sum())
        verdict, significance = top1_from_counts(
            only_before, only_after, int(before.correct.numel()), alpha
        )
        return Judgement(verdict, "labels", significance, before.metrics, after.metrics)
    labeled_iou = before.metrics.mean_iou is not None and after.metrics.mean_iou is not None
    if labeled_iou:  # too many images to keep their counts: no test
        return Judgement(Verdict.inconclusive, "labels", None, before.metrics, after.metrics)
    return Judgement(Verdict.unknown, None, None, before.metrics, after.metrics)


def decide_verdict(before: Evaluation, after: Evaluation) -> Verdict:
    """:func:`judge`'s verdict alone."""
    return judge(before, after).verdict


def mean_iou_replicates(counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The mean IoU of each bootstrap resample: ``counts`` (images, 3, classes) per-image labeled,
    predicted and hit pixels, ``weights`` (replicates, images) how often each image was drawn.
    Classes absent from a resample's labels and predictions are left out, as in the metric."""
    images, _, classes = counts.shape
    flat = counts.reshape(images, 3 * classes).astype(np.float64)
    sums = (weights @ flat).reshape(-1, 3, classes)
    labeled, predicted, hits = sums[:, 0], sums[:, 1], sums[:, 2]
    union = labeled + predicted - hits
    present = union > 0
    iou = np.divide(hits, union, out=np.zeros_like(hits), where=present)
    return iou.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def _judge_mean_iou(before: Evaluation, after: Evaluation, alpha: float) -> Judgement:
    before_counts = _as_numpy(before.image_counts)
    after_counts = _as_numpy(after.image_counts)
    if before_counts.shape[0] != after_counts.shape[0]:
        raise ValueError("before and after were evaluated on different images")
    classes = max(before_counts.shape[2], after_counts.shape[2])
    before_counts, after_counts = _widen(before_counts, classes), _widen(after_counts, classes)
    images = before_counts.shape[0]
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    weights = rng.multinomial(images, np.full(images, 1 / images), size=BOOTSTRAP_REPLICATES)
    weights = weights.astype(np.float64)
    before_replicates = mean_iou_replicates(before_counts, weights)
    after_replicates = mean_iou_replicates(after_counts, weights)
    difference = float(after.metrics.mean_iou or 0.0) - float(before.metrics.mean_iou or 0.0)
    verdict, significance = paired_bootstrap(
        difference, (after_replicates - before_replicates).tolist(), images, alpha
    )
    return Judgement(
        verdict,
        "labels",
        significance,
        _with_interval(before.metrics, bootstrap_interval(before_replicates.tolist())),
        _with_interval(after.metrics, bootstrap_interval(after_replicates.tolist())),
    )


def _as_numpy(counts: torch.Tensor | None) -> np.ndarray:
    if counts is None:
        raise ValueError("no per-image counts")
    return counts.numpy()


def _widen(counts: np.ndarray, classes: int) -> np.ndarray:
    return np.pad(counts, ((0, 0), (0, 0), (0, classes - counts.shape[2])))


def _with_interval(metrics: Metrics, interval: Interval) -> Metrics:
    return metrics.model_copy(update={"mean_iou_interval": interval})
