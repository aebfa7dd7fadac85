"""Label-free estimates of target top-1 from a labeled source validation set.

Method ``atc-ne+class-bound``: Average Thresholded Confidence (Garg et al., ICLR 2022) with the
negative-entropy score, capped by a bound that holds without any confidence assumption:

- ATC: on the labeled source set, the original model's score threshold ``t`` is chosen so that
  the share of source samples scoring above ``t`` equals its source top-1; the estimate on the
  target is the share of target samples above ``t``. It assumes that the model's confidence means
  on the target what it meant on the source, which fails exactly where a verdict matters: a model
  far out of its training distribution is confidently wrong (the digits demo: 8 % accurate at
  0.98 confidence).
- The class bound: a model cannot be right on more samples of class k than it predicts k, nor
  than there are samples of k. With no label shift (the target's class frequencies are the
  source's, π), top-1 ≤ Σ_k min(q_k, π_k) = 1 − TV(q, π), q the predicted class frequencies on the
  target. It needs no confidence at all: a model that collapses onto a few classes is bounded low.
  Both frequency vectors are samples, so the bound is loosened by their sampling noise in TV
  (√(K/n)/2 each).
- Reliability: an estimate counts as reliable only while the predicted class distribution stays
  as close to π as on the source (TV within ``TV_SLACK`` plus its sampling noise) — a model
  whose predictions no longer look like the source's is out of distribution, and its confidence
  says nothing — and while ATC's own estimate stays within ``MAX_DROP`` of the source top-1
  (ATC is biased under large shifts). An unreliable estimate keeps only its bound.

The label-free verdict (:func:`recalib.verdict.estimate_verdict`) compares the after estimate's
lower end with the before's upper bound, so a wrong confidence can only hide an improvement,
never invent one, as long as the after model's reliability check holds (see docs/label_free.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from recalib.contract import Estimate, EstimatedTop1, Interval
from recalib.verdict import wilson_interval

METHOD = "atc-ne+class-bound"
TV_SLACK = 0.10
"""How much further from π the target's predicted classes may be than the source's own."""

MAX_DROP = 0.15
"""An ATC estimate more than this below the source top-1 is unreliable: ATC's error grows with
the shift (Garg et al. 2022), and on the digits cases it overestimated inverted images by 0.34
(docs/label_free.md); near the source it stayed within 0.12."""


def scores_of(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 predictions and −entropy scores of (N, classes) logits."""
    return logits.argmax(dim=1).numpy(), negative_entropy(logits)


def negative_entropy(logits: torch.Tensor) -> np.ndarray:
    """Per-sample negative predictive entropy (nats) of (N, classes) logits, float64."""
    log_probs = torch.log_softmax(logits.double(), dim=1)
    probs = log_probs.exp()
    plogp = torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs))
    return plogp.sum(dim=1).numpy()


def class_frequencies(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Frequencies of each class id in ``classes`` (sums to 1)."""
    counts = np.bincount(classes.astype(np.int64), minlength=num_classes)[:num_classes]
    return counts / max(counts.sum(), 1)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(p - q).sum())


@dataclass(frozen=True)
class SourceReference:
    """What the labeled source set says about the original model."""

    threshold: float
    top1: float
    samples: int
    class_prior: np.ndarray
    source_tv: float  # TV between the model's predicted classes and the labels, on the source

    @classmethod
    def fit(
        cls, predictions: np.ndarray, scores: np.ndarray, labels: np.ndarray, num_classes: int
    ) -> SourceReference:
        """From the original model's top-1 predictions and −entropy scores on the labeled
        source set, and its labels (all per sample).

        Raises:
            ValueError: no samples, or labels outside the model's classes.
        """
        if len(predictions) == 0 or len(predictions) != len(labels):
            raise ValueError("the source evaluation set needs labeled samples")
        y = np.asarray(labels).astype(np.int64)
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"source labels must lie in [0, {num_classes})")
        top1 = float((predictions == y).mean())
        # ATC: the share of scores above t equals the accuracy
        threshold = float(np.quantile(scores, 1.0 - top1)) if top1 < 1 else -math.inf
        prior = class_frequencies(y, num_classes)
        return cls(
            threshold=threshold,
            top1=top1,
            samples=len(y),
            class_prior=prior,
            source_tv=total_variation(class_frequencies(predictions, num_classes), prior),
        )


def estimate_top1(
    reference: SourceReference, predictions: np.ndarray, scores: np.ndarray
) -> EstimatedTop1:
    """The estimated top-1 of a model on unlabeled target samples, from its top-1 predictions
    and −entropy scores (per sample)."""
    n = len(predictions)
    num_classes = len(reference.class_prior)
    predicted = class_frequencies(predictions, num_classes)
    tv = total_variation(predicted, reference.class_prior)
    # an empirical histogram of n samples over K classes is off from its distribution by about
    # √(K/n)/2 in TV or less (√(2/π)·Σ√(p(1−p)/n)/2 on average): the target's and the source's
    # class frequencies each get that slack before the bound is applied
    target_noise = 0.5 * math.sqrt(num_classes / max(n, 1))
    source_noise = 0.5 * math.sqrt(num_classes / reference.samples)
    bound = min(1.0, 1.0 - tv + target_noise + source_noise)
    allowed = reference.source_tv + TV_SLACK + target_noise
    above = int((scores > reference.threshold).sum())
    atc = wilson_interval(above, n)
    if tv > allowed:
        return EstimatedTop1(
            top1=None,
            interval=Interval(low=0.0, high=bound),
            reliable=False,
            upper_bound=bound,
            reason=f"predicted classes are {tv:.2f} (TV) from the source's label distribution, "
            f"more than {allowed:.2f}: the model is out of its training distribution and its "
            f"confidence says nothing; only the bound top-1 ≤ {bound:.2f} holds",
        )
    if above / n < reference.top1 - MAX_DROP:
        return EstimatedTop1(
            top1=None,
            interval=Interval(low=0.0, high=bound),
            reliable=False,
            upper_bound=bound,
            reason=f"the confidence-based estimate {above / n:.2f} is more than {MAX_DROP:.2f} "
            f"below the source top-1 {reference.top1:.2f}: under a shift this large it is "
            f"biased; only the bound top-1 ≤ {bound:.2f} holds",
        )
    return EstimatedTop1(
        top1=min(above / n, bound),
        interval=Interval(low=min(atc.low, bound), high=min(atc.high, bound)),
        reliable=True,
        upper_bound=bound,
        reason=f"predicted classes within {tv:.2f} (TV) of the source's label distribution",
    )


def estimate(
    source: tuple[np.ndarray, np.ndarray, np.ndarray],
    before: tuple[np.ndarray, np.ndarray],
    after: tuple[np.ndarray, np.ndarray],
    num_classes: int,
) -> Estimate:
    """``report.estimate``: ``source`` is (predictions, scores, labels) of the original model on
    the labeled source set; ``before``/``after`` (predictions, scores) on the unlabeled target."""
    reference = SourceReference.fit(*source, num_classes)
    return Estimate(
        method=METHOD,
        source_top1=reference.top1,
        source_samples=reference.samples,
        before=estimate_top1(reference, *before),
        after=estimate_top1(reference, *after),
    )
