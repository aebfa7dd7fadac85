"""The comparison of before and after recalibration: prediction change and the verdict.

:func:`decide_verdict` compares top-1 accuracies (classification) or mean IoUs (segmentation):
``unchanged`` when they differ by at most one sample's worth (1/samples: a single flipped sample
is noise, not a trend) or, for mean IoU, by at most ``MEAN_IOU_TOLERANCE``; ``better``/``worse``
otherwise, ``unknown`` without labels.
"""

from __future__ import annotations

import math

import torch

from recalib.contract import Metrics, Verdict

MEAN_IOU_TOLERANCE = 1e-3
"""Mean IoUs within this of each other give the verdict ``unchanged``."""


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


def decide_verdict(before: Metrics | None, after: Metrics | None) -> Verdict:
    """``better``/``worse``/``unchanged`` by top-1 (classification) or mean IoU (segmentation),
    ``unknown`` without labels.

    Accuracies within one sample's worth (``1 / samples``) of each other count as unchanged, mean
    IoUs within ``MEAN_IOU_TOLERANCE``.
    """
    if before is None or after is None:
        return Verdict.unknown
    if before.mean_iou is not None and after.mean_iou is not None:
        delta = after.mean_iou - before.mean_iou
        if abs(delta) <= MEAN_IOU_TOLERANCE:
            return Verdict.unchanged
        return Verdict.better if delta > 0 else Verdict.worse
    if before.top1 is None or after.top1 is None:
        return Verdict.unknown
    one_sample = 1.0 / max(min(before.samples, after.samples), 1)
    delta = after.top1 - before.top1
    if math.isclose(abs(delta), one_sample, rel_tol=1e-9) or abs(delta) < one_sample:
        return Verdict.unchanged
    return Verdict.better if delta > 0 else Verdict.worse
