"""worker.evaluation: per-class accuracy and the confidence histogram, exact on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from worker.evaluation import CONFIDENCE_BINS, evaluate

LN3, LN8 = math.log(3.0), math.log(8.0)


def _batches(logits: list[list[float]], labels: list[int], batch_size: int = 1):
    x, y = torch.tensor(logits), torch.tensor(labels)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def _bin(confidence: float) -> int:
    return min(int(confidence * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)


def test_per_class_accuracy_across_batches() -> None:
    # 4 classes. Class 0: 2 samples, 1 right. Class 1: 1 sample, right. Class 2: none.
    # Class 3: 1 sample, wrong (predicted 0).
    logits = [
        [LN3, 0.0, 0.0, 0.0],  # label 0, predicted 0
        [0.0, LN8, 0.0, 0.0],  # label 0, predicted 1
        [0.0, LN8, 0.0, 0.0],  # label 1, predicted 1
        [LN3, 0.0, 0.0, 0.0],  # label 3, predicted 0
    ]
    metrics = evaluate(nn.Identity(), _batches(logits, [0, 0, 1, 3], batch_size=3), labeled=True)
    assert metrics.metrics.per_class_accuracy == [0.5, 1.0, None, 0.0]
    # Consistent with overall top-1: the per-class hits add up to it.
    assert metrics.metrics.top1 == pytest.approx(0.5)


def test_confidence_histogram_counts_every_sample_in_its_bin() -> None:
    # max-softmax: [ln3, 0, 0] → 0.6; [0, ln8, 0] → 0.8; [0, 0, 0] → 1/3; [0, 1e4] → 1.0.
    logits = [[LN3, 0.0, 0.0], [0.0, LN8, 0.0], [0.0, 0.0, 0.0], [LN3, 0.0, 0.0]]
    result = evaluate(nn.Identity(), _batches(logits, [0, 0, 0, 0], batch_size=2), labeled=True)
    histogram = result.metrics.confidence_histogram
    assert histogram is not None
    assert len(histogram.counts) == CONFIDENCE_BINS
    assert histogram.bin_edges == pytest.approx(
        [i / CONFIDENCE_BINS for i in range(CONFIDENCE_BINS + 1)]
    )
    expected = [0] * CONFIDENCE_BINS
    for confidence in (0.6, 0.8, 1 / 3, 0.6):
        expected[_bin(confidence)] += 1
    assert histogram.counts == expected


def test_confidence_of_one_falls_in_the_last_bin() -> None:
    result = evaluate(nn.Identity(), _batches([[0.0, 1e4]], [1]), labeled=True)
    histogram = result.metrics.confidence_histogram
    assert histogram is not None
    assert histogram.counts[-1] == 1
    assert sum(histogram.counts) == 1


def test_unlabeled_has_a_histogram_but_no_per_class_accuracy() -> None:
    batches = _batches([[LN3, 0.0, 0.0], [0.0, 0.0, 0.0]], [-1, -1])
    metrics = evaluate(nn.Identity(), batches, labeled=False).metrics
    assert metrics.per_class_accuracy is None
    assert metrics.confidence_histogram is not None
    assert sum(metrics.confidence_histogram.counts) == 2
