"""The recalibration engine: re-estimate a model's BN running statistics on target-domain batches.

A plain function over an ``nn.Module`` and an iterable of batches, with no I/O: the CLI, the queue
worker and the tests all call :func:`recalibrate`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recalib.errors import (
    InvalidDataError,
    JobCancelledError,
    NoBatchNormError,
    StatisticsUnchangedError,
)
from worker.devices import move_batch
from worker.engine.bn_layers import BNLayer, find_bn_layers
from worker.engine.estimators import LayerEstimator, make_estimator, mix_with_prior
from worker.engine.results import LayerChange, RecalibrationResult, SkippedLayer

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int | None], None]
"""Called after each batch with (batches done, batches in total or None)."""


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    estimator: str = "population",
    momentum: float = 0.1,
    prior_strength: float = 0.0,
    tolerance: float | None = None,
    tolerance_window: int = 5,
    device: torch.device | None = None,
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
    total_batches: int | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RecalibrationResult:
    """Re-estimate the running statistics of every BN layer of ``model`` on ``batches`` (AdaBN).

    Only BN layers run in train mode (Dropout, DropPath and the rest stay in eval, unlike
    ``torch.optim.swa_utils.update_bn``, which calls ``model.train()``), under ``no_grad``. Only BN
    buffers change; parameters stay bit-identical. Afterwards every module has its original
    training flag and momentum (a model that arrived in train mode, usually by accident, is put
    wholly in eval mode, with a warning); on an exception or a cancel the original statistics
    are restored too.

    Args:
        model: any module with BN layers, eager or TorchScript; modified in place.
        batches: tensors, or tuples/lists whose first item is the input (``(inputs, labels)``),
            or dicts with an ``"inputs"`` key. A batch of one sample is merged into a neighbour,
            since train-mode BN cannot normalize a single value per channel.
        estimator: ``population`` (pooled, element-weighted), ``batch_mean`` (= ``update_bn``)
            or ``ema`` (BN's own rule with ``momentum``, no reset); see
            :mod:`worker.engine.estimators`.
        momentum: EMA momentum, for ``ema`` only.
        prior_strength: N of Schneider et al. 2020; stored stats are N/(N+n)·source +
            n/(N+n)·target with n the samples used. 0 keeps pure target statistics.
        tolerance: early stop once, over the last ``tolerance_window`` batches, no channel's
            estimated mean moved by more than ``tolerance`` running stds and no channel's std
            changed by more than that fraction.
        device: where batches go; default the model's device. Pinned, non-blocking on CUDA.
        channels_last: send 4-D batches in channels_last format (convert the model yourself).
        autocast_dtype: run forward passes under ``torch.autocast`` with this dtype.
        total_batches: for progress reporting.
        progress: called after each batch with (done, total).
        should_stop: polled before each batch; True raises :class:`JobCancelledError`.

    Returns:
        Which layers were recalibrated or skipped, how their statistics moved, samples used.

    Raises:
        NoBatchNormError: no recalibratable BN layer.
        InvalidDataError: fewer than 2 samples, or a batch train-mode BN cannot normalize.
        StatisticsUnchangedError: no BN layer updated its statistics in train mode (e.g. traced
            TorchScript with ``training=False`` baked into its graph).
        JobCancelledError: ``should_stop`` returned True.

    Example:
        >>> loader = DataLoader(target_dataset, batch_size=64)
        >>> result = recalibrate(model, loader)   # model is now adapted, in eval mode
    """
    layers, skipped = find_bn_layers(model)
    if not layers:
        detail = f" ({len(skipped)} skipped: {skipped[0].reason})" if skipped else ""
        raise NoBatchNormError(
            "model has no BatchNorm layers whose statistics can be re-estimated" + detail
        )
    device = device or _model_device(model)
    source = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in layers]
    source_counts = [layer.module.num_batches_tracked.clone() for layer in layers]
    run = _Run(layers, source, estimator, momentum, tolerance, tolerance_window)
    modes = {module: module.training for module in model.modules()}
    succeeded = False
    try:
        with _bn_train_mode(model, layers), torch.no_grad():
            for inputs in _at_least_two(batches, run):
                if should_stop is not None and should_stop():
                    raise JobCancelledError("job cancelled during recalibration")
                inputs = move_batch(inputs, device)
                if channels_last and inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                run.forward(model, inputs, autocast_dtype)
                if progress is not None:
                    progress(run.batches, total_batches)
                if run.converged():
                    break
        if run.samples < 2:
            raise InvalidDataError("calibration data has fewer than 2 samples; need at least 2")
        moved = run.finish(prior_strength, source_counts)
        skipped += moved.skipped
        succeeded = True
    finally:
        _restore_modes(model, modes)
        if not succeeded:
            _restore(layers, source, source_counts)
    return RecalibrationResult(
        layers=[layer.name for layer in moved.layers],
        skipped=skipped,
        changes=moved.changes,
        samples=run.samples,
        batches=run.batches,
        merged_batches=run.merged,
        stopped_early=run.stopped_early,
    )


@dataclass
class _Moved:
    layers: list[BNLayer]
    skipped: list[SkippedLayer]
    changes: list[LayerChange]


class _Run:
    """The state of one calibration pass: estimators, counts and the early-stop window."""

    def __init__(
        self,
        layers: list[BNLayer],
        source: list[tuple[torch.Tensor, torch.Tensor]],
        kind: str,
        momentum: float,
        tolerance: float | None,
        window: int,
    ) -> None:
        self.layers, self.source, self.kind = layers, source, kind
        self.estimators: list[LayerEstimator] = [
            make_estimator(kind, mean, var, momentum) for mean, var in source
        ]
        self.tolerance, self.window = tolerance, window
        self.history: deque[list[tuple[torch.Tensor, torch.Tensor]]] = deque(maxlen=window + 1)
        self.samples = self.batches = self.merged = 0
        self.stopped_early = False
        self.updated = [False] * len(layers)
        self.per_sample: list[int] | None = None  # scripted layers: elements per channel/sample

    def forward(self, model: nn.Module, inputs: torch.Tensor, dtype: torch.dtype | None) -> None:
        if self.per_sample is None and any(layer.scripted for layer in self.layers):
            self.per_sample = _probe_elements_per_sample(model, self.layers, inputs, dtype)
        for layer in self.layers:
            layer.prepare()
        first = self.batches == 0
        if first:  # later batches skip this host sync: whether a layer updates is structural
            before = [int(layer.module.num_batches_tracked) for layer in self.layers]
        _forward(model, inputs, dtype)
        for index, (layer, estimator) in enumerate(zip(self.layers, self.estimators, strict=True)):
            if first:
                # unchanged counter: not reached, or training=False baked in (traced TorchScript)
                self.updated[index] = int(layer.module.num_batches_tracked) != before[index]
            if not self.updated[index]:
                continue
            count = layer.last_count
            if layer.scripted and self.per_sample is not None:
                count = inputs.shape[0] * self.per_sample[index]
            mean, var = layer.read()
            estimator.update(mean, var, float(count))
        self.samples += int(inputs.shape[0])
        self.batches += 1

    def converged(self) -> bool:
        if self.tolerance is None:
            return False
        self.history.append([estimator.result() for estimator in self.estimators])
        if len(self.history) <= self.window:
            return False
        (old, new) = self.history[0], self.history[-1]
        for (old_mean, old_var), (new_mean, new_var) in zip(old, new, strict=True):
            std = new_var.clamp_min(1e-12).sqrt()
            mean_move = ((new_mean - old_mean).abs() / std).max()
            std_move = ((std - old_var.clamp_min(1e-12).sqrt()).abs() / std).max()
            if float(torch.maximum(mean_move, std_move)) > self.tolerance:
                return False
        self.stopped_early = True
        return True

    def finish(self, prior_strength: float, source_counts: list[torch.Tensor]) -> _Moved:
        """Write the estimates into the buffers; report layers that never updated."""
        if not any(self.updated):
            _restore(self.layers, self.source, source_counts)
            raise StatisticsUnchangedError(
                "no BatchNorm layer updated its statistics in train mode: the model's graph "
                "fixes training=False (a traced TorchScript module does); script it with "
                "torch.jit.script or export it with torch.export instead of torch.jit.trace"
            )
        moved = _Moved([], [], [])
        for index, layer in enumerate(self.layers):
            (old_mean, old_var), counter = self.source[index], source_counts[index]
            if not self.updated[index]:
                layer.running_mean.copy_(old_mean)
                layer.running_var.copy_(old_var)
                layer.module.num_batches_tracked.copy_(counter)
                moved.skipped.append(
                    SkippedLayer(
                        name=layer.name,
                        type=layer.type_name,
                        reason="not reached by the forward pass in train mode",
                    )
                )
                continue
            mean, var = self.estimators[index].result()
            mean = mix_with_prior(old_mean, mean, prior_strength, self.samples)
            var = mix_with_prior(old_var, var, prior_strength, self.samples)
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            # population/batch_mean restart the count as update_bn's reset does; ema continues it
            layer.module.num_batches_tracked.copy_(
                counter + self.batches if self.kind == "ema" else self.batches
            )
            moved.layers.append(layer)
            moved.changes.append(_layer_change(layer, old_mean, old_var))
        return moved


def _restore_modes(model: nn.Module, modes: dict[nn.Module, bool]) -> None:
    """Every module back to its flag; a model that arrived in train mode goes wholly to eval."""
    if modes[model]:
        logger.warning("model was in train mode; it is returned in eval mode for inference")
        model.eval()
        return
    for module, training in modes.items():
        module.train(training)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def _inputs(batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        batch = batch.get("inputs")
    elif isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise InvalidDataError(
            f"a calibration batch must be a tensor, an (inputs, ...) tuple or a dict with "
            f"'inputs'; got {type(batch).__name__}"
        )
    if batch.dim() == 0:
        raise InvalidDataError("a calibration batch is a scalar; expected N×... inputs")
    return batch


def _at_least_two(batches: Iterable[Any], run: _Run) -> Iterator[torch.Tensor]:
    """Yield input batches of ≥ 2 samples: a 1-sample batch joins its neighbour (lookahead 1)."""
    pending: torch.Tensor | None = None
    for batch in batches:
        inputs = _inputs(batch)
        if pending is None:
            pending = inputs
        elif pending.shape[0] < 2 or inputs.shape[0] < 2:
            pending = torch.cat([pending, inputs])
            run.merged += 1
        else:
            yield pending
            pending = inputs
    if pending is not None and pending.shape[0] >= 2:
        yield pending


def _forward(model: nn.Module, inputs: torch.Tensor, dtype: torch.dtype | None) -> None:
    autocast = (
        torch.autocast(inputs.device.type, dtype=dtype)
        if dtype is not None
        else contextlib.nullcontext()
    )
    try:
        with autocast:
            model(inputs)
    except ValueError as exc:
        if "Expected more than 1 value per channel" in str(exc):
            raise InvalidDataError(
                f"a BatchNorm layer saw one value per channel ({exc}); use a larger batch_size"
            ) from exc
        raise


@contextlib.contextmanager
def _bn_train_mode(model: nn.Module, layers: list[BNLayer]) -> Iterator[None]:
    """Model in eval, BN layers in train; eager BN at momentum 1 with an element-count hook."""
    model.eval()
    momenta: list[tuple[BNLayer, float | None]] = []
    try:
        for layer in layers:
            layer.module.train()
            if not layer.scripted:
                momenta.append((layer, layer.module.momentum))
                layer.module.momentum = 1.0  # running stats := this batch's stats
                layer.hook = layer.module.register_forward_pre_hook(_count_hook(layer))
        yield
    finally:
        for layer, value in momenta:
            layer.module.momentum = value
            if layer.hook is not None:
                layer.hook.remove()
                layer.hook = None


def _count_hook(layer: BNLayer) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        del module
        layer.last_count = args[0].numel() // layer.channels

    return hook


def _probe_elements_per_sample(
    model: nn.Module, layers: list[BNLayer], inputs: torch.Tensor, dtype: torch.dtype | None
) -> list[int]:
    """Elements per channel per sample of each scripted BN layer (no hooks on TorchScript).

    A batch X and its duplicate [X; X] have the same biased variance b, so their unbiased
    variances u1 = b·n/(n−1) and u2 = b·2n/(2n−1) give n = (2u1 − u2) / (2(u1 − u2)). Assumes the
    spatial size at each layer is the same for every batch (fixed input size). Where u1 ≈ u2
    (n too large to resolve in float32) the Bessel correction is negligible and n is taken large.
    """
    reads = []
    for probe in (inputs, torch.cat([inputs, inputs])):
        for layer in layers:
            layer.prepare()
        _forward(model, probe, dtype)
        reads.append([tuple(t.double() for t in layer.read()) for layer in layers])
    counts = []
    for (_, u1), (_, u2) in zip(reads[0], reads[1], strict=True):
        valid = (u1 - u2).abs() > 1e-5 * u1.abs()
        if not bool(valid.any()):
            counts.append(1_000_000)
            continue
        n = ((2 * u1 - u2) / (2 * (u1 - u2)))[valid].median()
        counts.append(max(1, round(float(n) / inputs.shape[0])))
    return counts


def _restore(
    layers: list[BNLayer],
    source: list[tuple[torch.Tensor, torch.Tensor]],
    counts: list[torch.Tensor],
) -> None:
    for layer, (mean, var), counter in zip(layers, source, counts, strict=True):
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
        layer.module.num_batches_tracked.copy_(counter)


def _layer_change(layer: BNLayer, old_mean: torch.Tensor, old_var: torch.Tensor) -> LayerChange:
    new_mean, new_var = layer.running_mean.double(), layer.running_var.double()
    old_mean, old_var = old_mean.double(), old_var.double()
    shift = (new_mean - old_mean) / (old_var + layer.eps).sqrt()
    ratio = (new_var.clamp_min(1e-12) / old_var.clamp_min(1e-12)).log().mean().exp()
    return LayerChange(
        name=layer.name,
        type=layer.type_name,
        channels=layer.channels,
        mean_shift_std=float(shift.square().mean().sqrt()),
        var_ratio=float(ratio) if math.isfinite(float(ratio)) else 0.0,
    )
