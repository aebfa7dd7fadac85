"""Segmentation metrics: pixel accuracy, mean IoU and IoU per class, from a confusion matrix.

Logits are (N, classes, h, w), masks N×H×W class ids. Logits smaller than the masks are upsampled
to the mask size (bilinear, ``align_corners=False``, as torchvision's segmentation models do it
themselves); larger ones are an error. Pixels whose mask value is ``ignore_index`` count nowhere.
IoU of class c = TP / (TP + FP + FN) over every evaluated pixel; the mean IoU averages the classes
that occur in the labels or the predictions (a class absent from both has no IoU: null).
Entropy, confidence and its histogram are per pixel (every pixel, labeled or not); the predictions
kept for :func:`~worker.evaluation.verdict.prediction_change` are the per-pixel arg-max, stored in
the smallest integer type that holds the class ids.
"""

from __future__ import annotations

import torch
from torch import nn

from recalib.contract import Metrics
from recalib.errors import InvalidDataError, InvalidModelError
from worker.evaluation.classification import (
    CONFIDENCE_BINS,
    Evaluation,
    confidence_bins,
    confidence_histogram,
    entropy_and_confidence,
)

MAX_IMAGE_COUNT_ENTRIES = 8_000_000
"""Most per-image class counts (images × 3 × classes, int64: 64 MB) kept for the paired bootstrap
of the verdict; an evaluation larger than that has no mean-IoU test (verdict ``inconclusive``)."""


def fit_to_masks(logits: torch.Tensor, mask_size: tuple[int, int]) -> torch.Tensor:
    """``logits`` (N, C, h, w) upsampled to ``mask_size`` when smaller.

    Raises:
        InvalidDataError: the logits are larger than the masks in a dimension.
    """
    height, width = mask_size
    if tuple(logits.shape[-2:]) == (height, width):
        return logits
    if logits.shape[-2] > height or logits.shape[-1] > width:
        raise InvalidDataError(
            f"the model's segmentation logits are {logits.shape[-2]}×{logits.shape[-1]} pixels, "
            f"larger than the {height}×{width} masks; give masks of the input size"
        )
    return nn.functional.interpolate(
        logits, size=(height, width), mode="bilinear", align_corners=False
    )


def _compact(predictions: torch.Tensor, classes: int) -> torch.Tensor:
    dtype = torch.uint8 if classes <= 256 else torch.int16 if classes <= 32768 else torch.int32
    return predictions.to(torch.device("cpu"), dtype)


class SegmentationAccumulator:
    """Running confusion matrix and per-pixel sums over batches of (N, C, h, w) logits."""

    def __init__(self, *, labeled: bool, ignore_index: int = 255) -> None:
        self.labeled, self.ignore_index = labeled, ignore_index
        self.samples = self.pixels = 0
        self.num_classes: int | None = None
        self._confusion: torch.Tensor | None = None  # [label, prediction], int64
        self._loss_sum = self._entropy_sum = self._confidence_sum = 0.0
        self._all_pixels = 0
        self._confidence_counts = torch.zeros(CONFIDENCE_BINS, dtype=torch.int64)
        self._predictions: list[torch.Tensor] = []
        self._image_counts: list[torch.Tensor] | None = []
        self._image_count_entries = 0

    def update(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        """Add one batch: ``logits`` (N, C, h, w); ``masks`` N×H×W (ignored when unlabeled)."""
        logits = logits.detach().float()
        if self.labeled:
            logits = fit_to_masks(logits, (int(masks.shape[-2]), int(masks.shape[-1])))
        classes = int(logits.shape[1])
        self.num_classes = classes
        self.samples += int(logits.shape[0])
        entropy, confidence = entropy_and_confidence(logits)
        self._all_pixels += entropy.numel()
        self._entropy_sum += float(entropy.sum(dtype=torch.float64))
        self._confidence_sum += float(confidence.sum(dtype=torch.float64))
        self._confidence_counts += confidence_bins(confidence)
        predictions = logits.argmax(dim=1)
        self._predictions.append(_compact(predictions, classes))
        if not self.labeled:
            return
        masks = masks.to(logits.device, torch.int64)
        valid = masks != self.ignore_index
        labels, predicted = masks[valid], predictions[valid]
        if bool(((labels < 0) | (labels >= classes)).any()):
            bad = int(labels[(labels < 0) | (labels >= classes)][0])
            raise InvalidDataError(
                f"mask value {bad} is outside the model's {classes} classes (0..{classes - 1}) "
                f"and is not ignore_index {self.ignore_index}"
            )
        pairs = torch.bincount(labels * classes + predicted, minlength=classes * classes)
        confusion = pairs.reshape(classes, classes).cpu()
        self._confusion = confusion if self._confusion is None else self._confusion + confusion
        self.pixels += int(labels.numel())
        self._image_count_entries += int(masks.shape[0]) * 3 * classes
        if self._image_count_entries > MAX_IMAGE_COUNT_ENTRIES:
            self._image_counts = None  # too many to keep: no bootstrap
        elif self._image_counts is not None:
            self._image_counts.append(_image_counts(masks, predictions, valid, classes))
        if labels.numel():
            per_pixel = logits.permute(0, 2, 3, 1)[valid]
            self._loss_sum += float(
                nn.functional.cross_entropy(per_pixel, labels, reduction="sum").double()
            )

    def result(self) -> Evaluation:
        """The metrics so far; raises :class:`InvalidModelError` when nothing was evaluated."""
        if self.samples == 0:
            raise InvalidModelError("no samples to evaluate: the evaluation data is empty")
        pixel_accuracy = mean_iou = per_class = loss = None
        if self.labeled and self._confusion is not None and self.pixels:
            confusion = self._confusion.double()
            hits = confusion.diagonal()
            pixel_accuracy = float(hits.sum() / confusion.sum())
            union = confusion.sum(0) + confusion.sum(1) - hits
            per_class = [
                float(h / u) if u > 0 else None
                for h, u in zip(hits.tolist(), union.tolist(), strict=True)
            ]
            present = [iou for iou in per_class if iou is not None]
            mean_iou = sum(present) / len(present) if present else None
            loss = self._loss_sum / self.pixels
        metrics = Metrics(
            samples=self.samples,
            loss=loss,
            mean_entropy=self._entropy_sum / self._all_pixels,
            mean_confidence=self._confidence_sum / self._all_pixels,
            confidence_histogram=confidence_histogram(self._confidence_counts),
            pixel_accuracy=pixel_accuracy,
            mean_iou=mean_iou,
            per_class_iou=per_class,
            pixels=self.pixels if self.labeled else None,
        )
        counts = None
        if self.labeled and self._image_counts:
            width = max(c.shape[2] for c in self._image_counts)
            counts = torch.cat(
                [nn.functional.pad(c, (0, width - c.shape[2])) for c in self._image_counts]
            )
        return Evaluation(
            metrics=metrics, predictions=_flat(self._predictions), image_counts=counts
        )


def _image_counts(
    masks: torch.Tensor, predictions: torch.Tensor, valid: torch.Tensor, classes: int
) -> torch.Tensor:
    """Per image and class: labeled pixels, predicted pixels, hits (ignored pixels left out);
    (images, 3, classes) int64 on the CPU. Summed over images they give the confusion matrix's
    row sums, column sums and diagonal, so any resample of images has its own mean IoU."""
    images = masks.shape[0]
    image_of = torch.arange(images, device=masks.device).view(-1, 1, 1).expand_as(masks)[valid]
    labels, predicted = masks[valid], predictions[valid]
    size = images * classes

    def per_image(values: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        keys = image_of * classes + values
        keys = keys if where is None else keys[where]
        return torch.bincount(keys, minlength=size).reshape(images, classes)

    counts = (per_image(labels), per_image(predicted), per_image(labels, labels == predicted))
    return torch.stack(counts, dim=1).cpu()


def _flat(predictions: list[torch.Tensor]) -> torch.Tensor:
    """All per-pixel predictions as one vector (batches may differ in size: no stacking)."""
    return torch.cat([p.reshape(-1) for p in predictions])
