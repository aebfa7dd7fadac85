"""Drift check: how far a target domain's BN inputs are from the statistics a model stores.

One forward pass in eval mode, nothing changed: :func:`measure_drift` puts a forward pre-hook on
every BN layer, pools the per-channel mean and (biased) variance of each layer's input over all
target samples, and compares them with the layer's ``running_mean``/``running_var``.

Per channel the divergence is the symmetric Kullback-Leibler divergence (Jeffreys, halved) between
the two Gaussians N(μ_t, σ_t²) (target) and N(μ_s, σ_s²) (stored), each variance plus the layer's
``eps`` (what BN itself divides by)::

    J = ½ [KL(t‖s) + KL(s‖t)] = ¼ (σ_t²/σ_s² + σ_s²/σ_t² − 2) + ¼ (μ_t − μ_s)² (1/σ_t² + 1/σ_s²)

It is 0 when the statistics agree, symmetric, and scale-free: rescaling a channel (a unit, a
gain) multiplies both means' difference and both stds alike and leaves J unchanged. A layer's
score is the mean of J over its channels; the model's score the mean of its layers' scores (every
layer weighs the same, however wide).

The model ends exactly as it came: same training flags, same buffers, hooks removed, also on an
exception. TorchScript layers take no hooks and are refused (export a ``.pt2`` instead).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recalib.errors import InvalidDataError, InvalidModelError, JobCancelledError, NoBatchNormError
from worker.devices import model_device
from worker.engine.bn_layers import BNLayer, find_bn_layers
from worker.engine.inputs import (
    CallFn,
    InputFn,
    batch_inputs,
    batch_size,
    call_model,
    check_inputs,
    move_batch,
)
from worker.engine.results import SkippedLayer

ProgressCallback = Callable[[int, int | None], None]
"""Called after each forward with (input batches done, input batches in total or None)."""


@dataclass(frozen=True)
class LayerDrift:
    """How far one BN layer's input on the target is from its stored statistics.

    ``score``: mean over channels of the symmetric KL divergence J (module docstring) less its
    sampling noise, nats; ``max_channel_score``: the largest channel's; ``noise``: the mean J that
    sampling noise alone would show with this many samples (subtracted); ``mean_shift_std``: RMS
    over channels of (target mean − stored mean) / stored std; ``var_ratio``: geometric mean over
    channels of target var / stored var (both with ``eps``).
    """

    name: str
    type: str
    channels: int
    score: float
    max_channel_score: float
    noise: float
    mean_shift_std: float
    var_ratio: float


@dataclass(frozen=True)
class DriftResult:
    """What :func:`measure_drift` measured. ``score``: mean of the layers' scores, nats."""

    score: float
    layers: list[LayerDrift]
    skipped: list[SkippedLayer]
    samples: int
    batches: int
    dropped_samples: int = 0

    def most_moved(self, count: int) -> list[LayerDrift]:
        """The ``count`` layers with the highest scores, highest first."""
        return sorted(self.layers, key=lambda layer: layer.score, reverse=True)[:count]


def symmetric_kl(
    mean_a: torch.Tensor, var_a: torch.Tensor, mean_b: torch.Tensor, var_b: torch.Tensor
) -> torch.Tensor:
    """Per channel ½[KL(a‖b) + KL(b‖a)] of two Gaussians, nats (variances must be > 0)."""
    ratio = var_a / var_b
    return 0.25 * (ratio + 1.0 / ratio - 2.0) + 0.25 * (mean_a - mean_b) ** 2 * (
        1.0 / var_a + 1.0 / var_b
    )


class _Moments:
    """Per-channel moments of a BN layer's inputs, per sample, centred on the stored mean.

    Each sample (one row of one call) contributes its per-channel mean ``m`` and mean square
    ``q`` over the other dimensions; sums of ``m``, ``q``, ``m²``, ``q²`` and ``m·q`` (float64)
    give the target mean and variance and their sampling variances (delta method), from which
    :meth:`compare` subtracts the divergence that sampling noise alone would show.
    """

    def __init__(self, layer: BNLayer) -> None:
        self.layer = layer
        self.centre = layer.running_mean.detach().double()
        self.count = 0
        self.sums = torch.zeros(5, layer.channels, dtype=torch.float64)  # m, q, m², q², m·q

    def add(self, inputs: torch.Tensor) -> None:
        channels = self.layer.channels
        if inputs.dim() < 2 or inputs.shape[1] != channels:
            raise InvalidDataError(
                f"BN layer {self.layer.name!r} got an input of shape {tuple(inputs.shape)}; "
                f"expected N×{channels}×…"
            )
        # plain float32 means of x and x² per sample and channel (the fastest reductions here:
        # centring the activation first costs ~8x); centred in float64 on the N×C results.
        # float32 cancellation in E[x²] − E[x]² is ~1e-7·mean²/var, negligible for BN inputs.
        values = inputs.detach().float().reshape(inputs.shape[0], channels, -1)
        mean, square = values.mean(dim=2).double(), (values * values).mean(dim=2).double()
        centre = self.centre.to(mean.device)[None, :]
        m = mean - centre
        q = square - 2 * centre * mean + centre * centre
        self.count += int(inputs.shape[0])
        self.sums += torch.stack([m, q, m * m, q * q, m * q]).sum(dim=1).cpu()

    def compare(self) -> LayerDrift:
        layer, n = self.layer, self.count
        m, q, mm, qq, mq = self.sums / n
        target_var = (q - m * m).clamp_min(0.0) + layer.eps
        stored_var = layer.running_var.detach().double().cpu() + layer.eps
        per_channel = symmetric_kl(m, target_var, torch.zeros_like(m), stored_var)
        # What J would read from noise alone: ½·Var(v)·∂²J/∂v² + ½·Var(μ)·∂²J/∂μ².
        var_m = (mm - m * m).clamp_min(0.0) / n
        var_v = (qq - q * q - 4 * m * (mq - m * q) + 4 * m * m * (mm - m * m)).clamp_min(0.0) / n
        noise = (
            0.25 * var_m * (1 / target_var + 1 / stored_var)
            + 0.25 * var_v * (stored_var + m * m) / target_var**3
        )
        debiased = (per_channel - noise).clamp_min(0.0)
        return LayerDrift(
            name=layer.name,
            type=layer.type_name,
            channels=layer.channels,
            score=float(debiased.mean()),
            max_channel_score=float(debiased.max()),
            noise=float(noise.mean()),
            mean_shift_std=float((m * m / stored_var).mean().sqrt()),
            var_ratio=float((target_var / stored_var).log().mean().exp()),
        )


def measure_drift(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    device: torch.device | None = None,
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
    batch_size_range: tuple[int, int | None] = (1, None),
    total_batches: int | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    input_fn: InputFn = batch_inputs,
    call_fn: CallFn = call_model,
) -> DriftResult:
    """Compare the statistics of every BN layer's input on ``batches`` with the stored ones.

    One forward pass per batch in eval mode under ``no_grad``; the model's outputs are never read
    and nothing of it changes (flags, buffers and parameters stay as they were; the hooks are
    removed in ``finally``). A BN module called several times per forward pools every call.

    Args:
        model: any eager (or ``.pt2``-rewritten) module with BN layers.
        batches: as for :func:`worker.engine.recalibrate` (``input_fn`` picks the inputs).
        device: where batches go; default the model's device.
        channels_last, autocast_dtype: as for :func:`worker.engine.recalibrate`.
        batch_size_range: samples per forward the model accepts; other batches are skipped and
            counted in ``dropped_samples`` (eval mode needs no merging: one sample is fine).
        total_batches, progress, should_stop: progress reporting and cancellation.

    Returns:
        Per layer and for the model, the divergence (module docstring) and the samples read.

    Raises:
        NoBatchNormError: no BN layer with running statistics, or none called by the forward.
        InvalidModelError: TorchScript BN layers (they take no hooks).
        InvalidDataError: no sample reached the model.
        JobCancelledError: ``should_stop`` returned True.
    """
    layers, skipped = find_bn_layers(model)
    if not layers:
        raise NoBatchNormError("model has no BatchNorm layers with running statistics to compare")
    scripted = [layer.name for layer in layers if layer.scripted]
    if scripted:
        raise InvalidModelError(
            f"the drift check reads BN inputs with forward hooks, which TorchScript layers "
            f"({', '.join(repr(n) for n in scripted[:5])}) do not take; check a torch.export "
            ".pt2 program or the eager model instead"
        )
    device = device or model_device(model)
    moments = [_Moments(layer) for layer in layers]
    min_size, max_size = batch_size_range
    samples = forwarded = dropped = done = 0
    with _hooks(model, moments), torch.no_grad():
        for batch in batches:
            done += 1
            if should_stop is not None and should_stop():
                raise JobCancelledError("job cancelled during the drift check")
            inputs = check_inputs(input_fn(batch))
            size = batch_size(inputs)
            if size < min_size or (max_size is not None and size > max_size):
                dropped += size
                continue
            inputs = move_batch(inputs, device, channels_last=channels_last)
            with _autocast(device, autocast_dtype):
                call_fn(model, inputs)
            samples, forwarded = samples + size, forwarded + 1
            if progress is not None:
                progress(done, total_batches)
    if samples == 0:
        raise InvalidDataError(
            "the drift check read no sample"
            + (f" ({dropped} outside the batch sizes the model takes)" if dropped else "")
        )
    unreached = [m.layer for m in moments if m.count == 0]
    skipped = skipped + [
        SkippedLayer(layer.name, layer.type_name, "never called by the forward pass")
        for layer in unreached
    ]
    results = [m.compare() for m in moments if m.count > 0]
    if not results:
        raise NoBatchNormError("no BatchNorm layer was called by the model's forward pass")
    score = sum(r.score for r in results) / len(results)
    return DriftResult(score, results, skipped, samples, forwarded, dropped)


@contextlib.contextmanager
def _hooks(model: nn.Module, moments: list[_Moments]) -> Iterator[None]:
    """Model wholly in eval with a pre-hook on each BN layer; flags and hooks restored after."""
    modes = {module: module.training for module in model.modules()}
    handles = []
    try:
        model.eval()
        for moment in moments:
            handles.append(
                moment.layer.module.register_forward_pre_hook(
                    lambda _module, args, moment=moment: moment.add(args[0])
                )
            )
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training  # each flag as it was (train() would recurse)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
