"""Classification metrics: top-1/top-5, loss, per-class accuracy, entropy and confidence.

:class:`ClassificationAccumulator` takes (N, classes) logits batch by batch. The label-free
metrics (mean predictive entropy, mean max-softmax confidence, its histogram) are always computed;
top-1, top-5 and the mean cross-entropy only with labels (``labeled=True``), top-5 only with at
least 5 classes. Sums are kept in float64 so the means do not drift over large data sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recalib.contract import ConfidenceHistogram, Metrics
from recalib.errors import InvalidModelError
from recalib.verdict import wilson_interval

CONFIDENCE_BINS = 20
"""Bins of ``Metrics.confidence_histogram`` over [0, 1] (width 0.05)."""


@dataclass
class Evaluation:
    """Metrics of one pass plus ``predictions``: top-1 class per sample (segmentation: per pixel,
    N×H×W in a compact integer type), in loader order; None without logits. ``output_change``:
    how far the outputs moved from the reference (label-free evaluations after recalibration).
    For the verdict: ``correct`` (classification with labels) whether each sample's top-1 was
    right, bool in loader order; ``image_counts`` (segmentation with labels) per image and class
    the labeled pixels, predicted pixels and hits, (images, 3, classes) int64. For the label-free
    estimate (classification): ``negative_entropy`` per sample (nats, float32), ``num_classes``,
    and with labels ``labels``."""

    metrics: Metrics
    predictions: torch.Tensor | None
    output_change: object | None = None
    correct: torch.Tensor | None = None
    image_counts: torch.Tensor | None = None
    negative_entropy: torch.Tensor | None = None
    num_classes: int | None = None
    labels: torch.Tensor | None = None


def confidence_histogram(counts: torch.Tensor) -> ConfidenceHistogram:
    """The histogram record of ``CONFIDENCE_BINS`` counts over [0, 1]."""
    return ConfidenceHistogram(
        bin_edges=[i / CONFIDENCE_BINS for i in range(CONFIDENCE_BINS + 1)],
        counts=counts.tolist(),
    )


def confidence_bins(confidence: torch.Tensor) -> torch.Tensor:
    """Counts per bin of a tensor of max-softmax probabilities (on the CPU)."""
    bins = (confidence.reshape(-1) * CONFIDENCE_BINS).long().clamp_(0, CONFIDENCE_BINS - 1)
    return torch.bincount(bins, minlength=CONFIDENCE_BINS).cpu()


def entropy_and_confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (dimension 1 = classes) predictive entropy, nats, and max-softmax probability."""
    log_probs = torch.log_softmax(logits, dim=1)
    probs = log_probs.exp()
    # p·log p is 0 for p = 0; the product gives NaN there (0 · −inf), hence the mask.
    plogp = torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs))
    return -plogp.sum(dim=1), probs.max(dim=1).values


class ClassificationAccumulator:
    """Running sums over batches of logits; :meth:`result` turns them into an :class:`Evaluation`.

    Sums are kept in float64 so the means do not drift over large data sets.
    """

    def __init__(self, *, labeled: bool) -> None:
        self.labeled = labeled
        self.samples = 0
        self.num_classes: int | None = None
        self._top1 = 0
        self._top5 = 0
        self._loss_sum = 0.0
        self._entropy_sum = 0.0
        self._confidence_sum = 0.0
        self._predictions: list[torch.Tensor] = []
        self._correct: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._negative_entropy: list[torch.Tensor] = []
        self._confidence_counts = torch.zeros(CONFIDENCE_BINS, dtype=torch.int64)
        self._class_hits = torch.zeros(0, dtype=torch.int64)  # per label, grown as needed
        self._class_totals = torch.zeros(0, dtype=torch.int64)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch: ``logits`` (N, classes), ``labels`` (N,) int (ignored when unlabeled)."""
        logits = logits.detach().float()
        self.num_classes = logits.shape[1]
        self.samples += logits.shape[0]
        entropy, confidence = entropy_and_confidence(logits)
        self._entropy_sum += float(entropy.sum(dtype=torch.float64))
        self._confidence_sum += float(confidence.sum(dtype=torch.float64))
        self._confidence_counts += confidence_bins(confidence)
        self._negative_entropy.append((-entropy).cpu())
        predictions = logits.argmax(dim=1)
        self._predictions.append(predictions.cpu())
        if not self.labeled:
            return
        labels = labels.to(logits.device, torch.int64)
        self._top1 += int((predictions == labels).sum())
        self._correct.append((predictions == labels).cpu())
        self._labels.append(labels.cpu())
        self._count_per_class(labels, predictions == labels)
        if self.num_classes >= 5:
            top5 = logits.topk(5, dim=1).indices
            self._top5 += int((top5 == labels[:, None]).any(dim=1).sum())
        self._loss_sum += float(
            nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        )

    def result(self) -> Evaluation:
        """The metrics so far; raises :class:`InvalidModelError` when nothing was evaluated."""
        if self.samples == 0:
            raise InvalidModelError("no samples to evaluate: the evaluation data is empty")
        n = self.samples
        with_top5 = self.labeled and (self.num_classes or 0) >= 5
        metrics = Metrics(
            top1=self._top1 / n if self.labeled else None,
            top1_interval=wilson_interval(self._top1, n) if self.labeled else None,
            top5=self._top5 / n if with_top5 else None,
            loss=self._loss_sum / n if self.labeled else None,
            samples=n,
            mean_entropy=self._entropy_sum / n,
            mean_confidence=self._confidence_sum / n,
            per_class_accuracy=self._per_class_accuracy() if self.labeled else None,
            confidence_histogram=confidence_histogram(self._confidence_counts),
        )
        correct = torch.cat(self._correct) if self.labeled else None
        return Evaluation(
            metrics=metrics,
            predictions=torch.cat(self._predictions),
            correct=correct,
            negative_entropy=torch.cat(self._negative_entropy),
            num_classes=self.num_classes,
            labels=torch.cat(self._labels) if self.labeled else None,
        )

    def _count_per_class(self, labels: torch.Tensor, correct: torch.Tensor) -> None:
        totals = torch.bincount(labels, minlength=self.num_classes or 0).cpu()
        hits = torch.bincount(labels[correct], minlength=totals.numel()).cpu()
        size = max(totals.numel(), self._class_totals.numel())
        self._class_totals = _grow(self._class_totals, size) + _grow(totals, size)
        self._class_hits = _grow(self._class_hits, size) + _grow(hits, size)

    def _per_class_accuracy(self) -> list[float | None]:
        """Accuracy per label (index = class), None for a class without samples."""
        pairs = zip(self._class_hits.tolist(), self._class_totals.tolist(), strict=True)
        return [hits / total if total else None for hits, total in pairs]


def _grow(counts: torch.Tensor, size: int) -> torch.Tensor:
    """``counts`` zero-padded to at least ``size`` entries."""
    return nn.functional.pad(counts, (0, max(size - counts.numel(), 0)))
