"""Model quality on one data set, and the comparison of before and after recalibration.

:func:`evaluate` streams a loader of ``(inputs, labels)`` batches through a model (no gradients)
and returns :class:`~recalib.contract.Metrics` plus the top-1 prediction of every sample, so that
:func:`prediction_change` can compare two runs over the same samples. The label-free metrics (mean
predictive entropy, mean max-softmax confidence) are always computed; top-1, top-5 and the mean
cross-entropy only with labels (``labeled=True``), top-5 only with at least 5 classes.

:func:`decide_verdict` compares top-1 accuracies: ``unchanged`` when they differ by at most one
sample's worth (1/samples: a single flipped sample is noise, not a trend), ``better``/``worse``
otherwise, ``unknown`` without labels.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from recalib.contract import ConfidenceHistogram, Metrics, Verdict
from recalib.errors import InvalidModelError, JobCancelledError

ProgressCallback = Callable[[int, int | None], None]
Batch = tuple[torch.Tensor, torch.Tensor]
CONFIDENCE_BINS = 20
"""Bins of ``Metrics.confidence_histogram`` over [0, 1] (width 0.05)."""


@dataclass
class Evaluation:
    """Metrics of one pass plus ``predictions``: top-1 class per sample, int64, in loader order."""

    metrics: Metrics
    predictions: torch.Tensor


class MetricsAccumulator:
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
        self._confidence_counts = torch.zeros(CONFIDENCE_BINS, dtype=torch.int64)
        self._class_hits = torch.zeros(0, dtype=torch.int64)  # per label, grown as needed
        self._class_totals = torch.zeros(0, dtype=torch.int64)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch: ``logits`` (N, classes), ``labels`` (N,) int (ignored when unlabeled)."""
        logits = logits.detach().float()
        log_probs = torch.log_softmax(logits, dim=1)
        probs = log_probs.exp()
        self.num_classes = logits.shape[1]
        self.samples += logits.shape[0]
        # p·log p is 0 for p = 0; the product gives NaN there (0 · −inf), hence the mask.
        plogp = torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs))
        self._entropy_sum += float(-plogp.sum(dtype=torch.float64))
        confidence = probs.max(dim=1).values
        self._confidence_sum += float(confidence.sum(dtype=torch.float64))
        bins = (confidence * CONFIDENCE_BINS).long().clamp_(0, CONFIDENCE_BINS - 1)
        self._confidence_counts += torch.bincount(bins, minlength=CONFIDENCE_BINS).cpu()
        predictions = logits.argmax(dim=1)
        self._predictions.append(predictions.cpu())
        if not self.labeled:
            return
        labels = labels.to(logits.device, torch.int64)
        self._top1 += int((predictions == labels).sum())
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
            top5=self._top5 / n if with_top5 else None,
            loss=self._loss_sum / n if self.labeled else None,
            samples=n,
            mean_entropy=self._entropy_sum / n,
            mean_confidence=self._confidence_sum / n,
            per_class_accuracy=self._per_class_accuracy() if self.labeled else None,
            confidence_histogram=ConfidenceHistogram(
                bin_edges=[i / CONFIDENCE_BINS for i in range(CONFIDENCE_BINS + 1)],
                counts=self._confidence_counts.tolist(),
            ),
        )
        return Evaluation(metrics=metrics, predictions=torch.cat(self._predictions))

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


def forward_logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``model(inputs)``, checked to be finite (N, classes) floating-point logits.

    Raises:
        InvalidModelError: the output is not a 2-D float tensor with one row per input, or it
            holds NaN/inf.
    """
    output = model(inputs)
    if not isinstance(output, torch.Tensor):
        raise InvalidModelError(
            f"the model returned {type(output).__name__}, expected a (batch, classes) tensor of "
            "logits; wrap the model so forward() returns the classification logits only"
        )
    if output.ndim != 2 or not output.is_floating_point() or output.shape[0] != inputs.shape[0]:
        raise InvalidModelError(
            f"the model's output has shape {tuple(output.shape)} and dtype {output.dtype}, "
            f"expected ({inputs.shape[0]}, classes) floating-point logits for a batch of "
            f"{inputs.shape[0]}; recalib evaluates classifiers only"
        )
    if not bool(torch.isfinite(output).all()):
        raise InvalidModelError(
            "the model's output contains NaN or inf; check the input scale and preprocessing"
        )
    return output


@contextlib.contextmanager
def _autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def _prepare(inputs: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    inputs = inputs.to(device, non_blocking=True)
    if channels_last and inputs.ndim == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def pad_batch(inputs: torch.Tensor, min_batch_size: int) -> torch.Tensor:
    """``inputs`` with its last sample repeated up to ``min_batch_size`` rows (eval mode only:
    there each sample's output is independent of the others, so padding rows change nothing)."""
    missing = min_batch_size - inputs.shape[0]
    if missing <= 0 or inputs.shape[0] == 0:
        return inputs
    return torch.cat([inputs, inputs[-1:].expand(missing, *inputs.shape[1:])])


def _logits(model: nn.Module, inputs: torch.Tensor, min_batch_size: int) -> torch.Tensor:
    """Logits of ``inputs``, padded to ``min_batch_size`` for the call, padding rows dropped."""
    return forward_logits(model, pad_batch(inputs, min_batch_size))[: inputs.shape[0]]


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    labeled: bool,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    min_batch_size: int = 1,
    total_batches: int | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Evaluation:
    """Evaluate ``model`` as it is (its mode is not changed: put it in eval mode first).

    Args:
        model: a classifier returning (N, classes) logits, already on ``device``.
        batches: ``(inputs, labels)`` pairs; labels are ignored unless ``labeled``.
        labeled: compute top-1/top-5/loss (labels must lie in [0, classes)).
        device: where inputs are moved; default the device of the first parameter (CPU if none).
        autocast_dtype: run forward passes under autocast with this dtype; metrics stay float32.
        channels_last: convert 4-D inputs to channels_last memory format.
        min_batch_size: the fewest samples the model takes per call (a ``torch.export``
            program with a fixed batch size): shorter batches are padded with copies of their
            last sample, whose outputs are discarded (exact in eval mode).
        total_batches: passed to ``progress`` as the total.
        progress: called with ``(batches_done, total_batches)`` after each batch.
        should_stop: polled before each batch; True raises :class:`JobCancelledError`.

    Returns:
        The metrics and the top-1 predictions in batch order.
    """
    device = device or _model_device(model)
    accumulator = MetricsAccumulator(labeled=labeled)
    with torch.inference_mode():
        for done, (inputs, labels) in enumerate(batches, start=1):
            if should_stop is not None and should_stop():
                raise JobCancelledError("the job was cancelled during evaluation")
            with _autocast(device, autocast_dtype):
                x = _prepare(inputs, device, channels_last)
                logits = _logits(model, x, min_batch_size)
            accumulator.update(logits, labels)
            if progress is not None:
                progress(done, total_batches)
    return accumulator.result()


def max_output_diff(
    reference: nn.Module,
    candidate: nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device | None = None,
    min_batch_size: int = 1,
    should_stop: Callable[[], bool] | None = None,
) -> float:
    """Largest ``|candidate(x) − reference(x)|`` over all outputs of all batches (float32);
    ``min_batch_size`` pads short batches as :func:`evaluate` does."""
    device = device or _model_device(reference)
    largest = 0.0
    with torch.inference_mode():
        for inputs, _labels in batches:
            if should_stop is not None and should_stop():
                raise JobCancelledError("the job was cancelled while checking the folded model")
            x = inputs.to(device)
            diff = (
                _logits(candidate, x, min_batch_size).float()
                - _logits(reference, x, min_batch_size).float()
            )
            largest = max(largest, float(diff.abs().max()))
    return largest


def infer_num_classes(model: nn.Module, inputs: torch.Tensor) -> int:
    """Number of outputs of ``model`` from one forward pass of a small batch (no gradients)."""
    with torch.inference_mode():
        return int(forward_logits(model, inputs.to(_model_device(model))).shape[1])


def prediction_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """Fraction of samples whose top-1 prediction differs between two passes over the same data."""
    if before.shape != after.shape:
        raise ValueError(f"prediction vectors differ in shape: {before.shape} vs {after.shape}")
    if before.numel() == 0:
        return 0.0
    return float((before != after).double().mean())


def decide_verdict(before: Metrics | None, after: Metrics | None) -> Verdict:
    """``better``/``worse``/``unchanged`` by top-1, ``unknown`` without labels.

    Accuracies within one sample's worth (``1 / samples``) of each other count as unchanged.
    """
    if before is None or after is None or before.top1 is None or after.top1 is None:
        return Verdict.unknown
    one_sample = 1.0 / max(min(before.samples, after.samples), 1)
    delta = after.top1 - before.top1
    if math.isclose(abs(delta), one_sample, rel_tol=1e-9) or abs(delta) < one_sample:
        return Verdict.unchanged
    return Verdict.better if delta > 0 else Verdict.worse


def _model_device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")
