"""How per-batch BN statistics are combined into running statistics: one small object per layer.

Each estimator receives, after every call of its BN layer, that call's per-channel mean, unbiased
variance and element count per channel, and yields the running statistics to store. A layer
called once per forward gets one update per batch; a layer called k times per forward (a shared
module) gets k updates per batch: ``population`` then pools all calls' activations exactly,
``batch_mean`` and ``ema`` count every call as one update, as train-mode BN itself does (with
``momentum=None`` / its momentum). As in fvcore's ``precise_bn``, the averaging rule is one
object, not flags spread through the loop.
"""

from __future__ import annotations

from typing import Protocol

import torch

from recalib.errors import InvalidOptionError

ESTIMATORS = ("population", "batch_mean", "ema")
"""The estimator names :func:`make_estimator` knows (the contract's ``Estimator`` values)."""


class LayerEstimator(Protocol):
    def update(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """Add one call: per-channel mean, unbiased variance, elements per channel."""

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The running mean and (unbiased) running variance to store."""


class PopulationEstimator:
    """Pooled statistics of all activations, each call weighted by its element count.

    mean = E[x], var = (E[x²] − E[x]²)·n/(n−1) over all n elements per channel, combined batch by
    batch with Chan's parallel update in float64 (stable where E[x²] − E[x]² is not), so a small
    or partial batch weighs exactly as much as its elements.
    """

    def __init__(self, like: torch.Tensor) -> None:
        dtype = torch.float32 if like.device.type == "mps" else torch.float64
        self.count = 0.0
        self.mean = torch.zeros_like(like, dtype=dtype)
        self.m2 = torch.zeros_like(like, dtype=dtype)  # sum of squared deviations

    def update(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        batch_mean = mean.to(self.mean.dtype)
        batch_m2 = var.to(self.mean.dtype) * (count - 1)
        total = self.count + count
        delta = batch_mean - self.mean
        self.mean += delta * (count / total)
        self.m2 += batch_m2 + delta.square() * (self.count * count / total)
        self.count = total

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        var = self.m2 / max(self.count - 1.0, 1.0)
        return self.mean.float(), var.float()


class BatchMeanEstimator:
    """Equal weight per call: torch ``swa_utils.update_bn``'s cumulative moving average.

    Uses the same update as BN with ``momentum=None`` (``running = (1 − 1/k)·running + 1/k·batch``),
    so the result equals ``update_bn`` on the same batches up to float32 rounding (BN's CPU kernel
    blends a double-precision batch mean; we read the float32 one): ~1e-7 absolute on digits.
    """

    def __init__(self, like: torch.Tensor) -> None:
        self.batches = 0
        self.mean = torch.zeros_like(like, dtype=torch.float32)
        self.var = torch.ones_like(like, dtype=torch.float32)

    def update(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        del count
        self.batches += 1
        factor = 1.0 / self.batches
        self.mean = mean * factor + self.mean * (1.0 - factor)
        self.var = var * factor + self.var * (1.0 - factor)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, self.var


class EmaEstimator:
    """Exponential moving average from the current statistics, no reset: BN's own training rule
    (one step per call)."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, momentum: float) -> None:
        self.momentum = momentum
        self.mean = mean.detach().clone().float()
        self.var = var.detach().clone().float()

    def update(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        del count
        self.mean = mean * self.momentum + self.mean * (1.0 - self.momentum)
        self.var = var * self.momentum + self.var * (1.0 - self.momentum)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, self.var


def make_estimator(
    kind: str, source_mean: torch.Tensor, source_var: torch.Tensor, momentum: float
) -> LayerEstimator:
    """The estimator ``kind`` (one of :data:`ESTIMATORS`) for one layer whose statistics before
    calibration are ``source_*``."""
    if kind == "population":
        return PopulationEstimator(source_mean)
    if kind == "batch_mean":
        return BatchMeanEstimator(source_mean)
    if kind == "ema":
        return EmaEstimator(source_mean, source_var, momentum)
    raise InvalidOptionError(
        f"unknown estimator {kind!r}; use one of {', '.join(ESTIMATORS)}", field="estimator"
    )


AUTO_PRIOR = "auto"
"""``prior_strength`` value that chooses N per layer from the data (:func:`auto_prior_strength`)."""

SCRIPTED_PRIOR_STRENGTH = 16.0
"""N for TorchScript layers under ``auto``: they take no hooks, so their per-sample statistics
are unknown; 16 is what Schneider et al. 2020 found to work with few samples."""

MAX_PRIOR_STRENGTH = 1e12
"""N reported when the data cannot tell the target from the source at all (weight 1 on it)."""


class SampleMoments:
    """Per-sample, per-channel moments of one BN layer's input, centred on its source mean.

    From each sample's channel mean ``m`` and mean square ``q`` (over the other dimensions):
    the target mean and variance and the sampling variance of both (delta method), which
    :func:`auto_prior_strength` weighs against their distance from the source statistics.
    """

    def __init__(self, source_mean: torch.Tensor) -> None:
        self.centre = source_mean.detach().double()
        self.samples = 0
        self.sums = torch.zeros(5, source_mean.numel(), dtype=torch.float64)  # m, q, m², q², mq

    def add(self, inputs: torch.Tensor) -> None:
        channels = self.centre.numel()
        # plain float32 means of x and x² per sample and channel (the fastest reductions here:
        # centring the activation first costs ~8x); centred in float64 on the N×C results.
        # float32 cancellation in E[x²] − E[x]² is ~1e-7·mean²/var, negligible for BN inputs.
        values = inputs.detach().float().reshape(inputs.shape[0], channels, -1)
        mean, square = values.mean(dim=2).double(), (values * values).mean(dim=2).double()
        centre = self.centre.to(mean.device)[None, :]
        m = mean - centre
        q = square - 2 * centre * mean + centre * centre
        self.samples += int(inputs.shape[0])
        self.sums += torch.stack([m, q, m * m, q * q, m * q]).sum(dim=1).cpu()

    def source_weight(self, source_var: torch.Tensor) -> float:
        """The MSE-optimal weight w of the source in w·source + (1 − w)·target, one per layer:
        estimation variance / (estimation variance + squared shift), both summed over channels
        in units of the source variance (means) and its square (variances). E[(target −
        source)²] = shift² + estimation variance, so w = estimation variance / that, clamped to
        [0, 1]."""
        n = self.samples
        if n < 2:
            return 1.0
        m, q, mm, qq, mq = self.sums / n
        var_s = source_var.detach().double().cpu().clamp_min(1e-12)
        var_t = (q - m * m).clamp_min(0.0)
        spread_m = (mm - m * m).clamp_min(0.0) * n / (n - 1)
        spread_v = (qq - q * q - 4 * m * (mq - m * q) + 4 * m * m * (mm - m * m)).clamp_min(0.0)
        estimation = (spread_m / n / var_s).sum() + (spread_v * n / (n - 1) / n / var_s**2).sum()
        distance = (m * m / var_s).sum() + ((var_t - var_s) ** 2 / var_s**2).sum()
        if float(distance) <= 0.0:
            return 1.0
        return float((estimation / distance).clamp(0.0, 1.0))


def prior_strength_of(weight: float, samples: int) -> float:
    """N such that N/(N + n) = ``weight`` (capped at :data:`MAX_PRIOR_STRENGTH`)."""
    if weight >= 1.0:
        return MAX_PRIOR_STRENGTH
    return min(MAX_PRIOR_STRENGTH, samples * weight / (1.0 - weight))


def mix_with_prior(
    source: torch.Tensor, target: torch.Tensor, prior_strength: float, samples: int
) -> torch.Tensor:
    """Schneider et al. 2020: N/(N+n)·source + n/(N+n)·target, N = prior_strength, n = samples."""
    if prior_strength <= 0:
        return target
    weight = prior_strength / (prior_strength + samples)
    return source.to(target.dtype) * weight + target * (1.0 - weight)
