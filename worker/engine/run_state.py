"""The state of one calibration pass: an estimator per layer, counts, the early-stop window.

Eager BN layers report every call through :meth:`CalibrationRun.record` (a forward hook), so a
layer called several times per forward (weight sharing) pools all its calls. Scripted layers are
read once per forward from their buffers; one whose ``num_batches_tracked`` moved by more than 1
in a forward was called more than once, which cannot be measured: it is refused by name.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from recalib.errors import InvalidDataError, InvalidModelError, StatisticsUnchangedError
from worker.engine.bn_layers import BNLayer, probe_elements_per_sample
from worker.engine.estimators import (
    AUTO_PRIOR,
    SCRIPTED_PRIOR_STRENGTH,
    LayerEstimator,
    SampleMoments,
    make_estimator,
    mix_with_prior,
    prior_strength_of,
)
from worker.engine.inputs import CallFn, Inputs, batch_size, call_model, concat, first_tensor
from worker.engine.results import Convergence, LayerChange, PriorChoice, SkippedLayer


@dataclass
class Moved:
    """What :meth:`CalibrationRun.finish` wrote: recalibrated layers and those never reached."""

    layers: list[BNLayer]
    skipped: list[SkippedLayer]
    changes: list[LayerChange]
    prior: PriorChoice | None = None
    convergence: Convergence | None = None


def one_value_error(
    layer: str, values: int, samples: int, max_batch: int | None
) -> InvalidDataError | InvalidModelError:
    """The error for a BN layer that would normalize ``values`` (< 2) values per channel."""
    what = f"BatchNorm layer {layer!r}" if layer else "a BatchNorm layer"
    problem = (
        f"{what} gets {values} value(s) per channel from a batch of {samples} sample(s), and "
        "train-mode BN needs at least 2"
    )
    if max_batch is not None and max_batch < 2:
        return InvalidModelError(
            f"{problem}; the model takes only {max_batch} sample per forward (a program exported "
            "with a fixed batch size): export it with a dynamic batch dimension "
            "(torch.export dynamic_shapes={0: Dim('batch')}) or a batch size of 2 or more"
        )
    return InvalidDataError(f"{problem}; use a larger batch_size")


class CalibrationRun:
    """Estimators, counters and the early-stop window of one :func:`recalibrate` call."""

    def __init__(
        self,
        layers: list[BNLayer],
        kind: str,
        momentum: float,
        tolerance: float | None,
        window: int,
        max_batch: int | None = None,
        call_fn: CallFn = call_model,
        *,
        auto_prior: bool = False,
        total_batches: int | None = None,
    ) -> None:
        self.layers, self.kind, self.max_batch = layers, kind, max_batch
        self.call_fn = call_fn
        self.source = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in layers]
        self.source_counts = [layer.module.num_batches_tracked.clone() for layer in layers]
        self.estimators: list[LayerEstimator] = [
            make_estimator(kind, mean, var, momentum) for mean, var in self.source
        ]
        self.tolerance, self.window = tolerance, window
        self.history: deque[list[tuple[torch.Tensor, torch.Tensor]]] = deque(maxlen=window + 1)
        self.samples = self.batches = 0
        self.stopped_early = False
        self.updated = [False] * len(layers)
        self.calls = [0] * len(layers)  # calls measured per layer, over all batches
        self.recording = True  # off while probing scripted layers
        self.per_sample: list[int] | None = None  # scripted layers: elements per channel/sample
        # auto prior: per-sample moments of each eager layer's input (scripted ones take no hook)
        self.moments = [SampleMoments(mean) for mean, _ in self.source] if auto_prior else None
        # convergence: the estimates after 3/4 of the batches, compared with the final ones
        self.snapshot_at = (total_batches * 3) // 4 if total_batches and total_batches >= 4 else 0
        self.snapshot: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.snapshot_samples = 0

    def record(self, index: int, count: int, inputs: torch.Tensor | None = None) -> None:
        """One call of eager layer ``index`` on ``count`` elements per channel just finished
        (``inputs``: that call's input, for the auto prior's per-sample moments)."""
        if not self.recording:
            return
        mean, var = self.layers[index].read()
        self.estimators[index].update(mean, var, float(count))
        self.calls[index] += 1
        if self.moments is not None and inputs is not None:
            self.moments[index].add(inputs)

    def forward(self, model: nn.Module, inputs: Inputs, dtype: torch.dtype | None) -> None:
        """Run one batch; eager layers record through their hooks, scripted ones are read."""
        if self.per_sample is None and any(layer.scripted for layer in self.layers):
            self.recording = False
            try:
                self.per_sample = probe_elements_per_sample(
                    self.layers,
                    lambda x: self._call(model, x, dtype),
                    (inputs, concat(inputs, inputs)),
                    batch_size(inputs),
                )
            finally:
                self.recording = True
        for layer in self.layers:
            layer.prepare()
        first = self.batches == 0
        if first:  # later batches skip this host sync: whether a layer updates is structural
            before = [int(layer.module.num_batches_tracked) for layer in self.layers]
        self._call(model, inputs, dtype)
        for index, layer in enumerate(self.layers):
            if first:
                # unchanged counter: not reached, or training=False baked in (traced TorchScript)
                moved = int(layer.module.num_batches_tracked) - before[index]
                self.updated[index] = moved != 0
                if layer.scripted and moved > 1:
                    raise InvalidModelError(
                        f"TorchScript BatchNorm layer {layer.name!r} is called {moved} times per "
                        "forward (a shared module); the statistics of each call cannot be read "
                        "from a scripted model: recalibrate the eager model or a torch.export "
                        ".pt2 program instead"
                    )
            if not self.updated[index] or not layer.scripted:
                continue
            count = batch_size(inputs) * (self.per_sample[index] if self.per_sample else 1)
            mean, var = layer.read()
            self.estimators[index].update(mean, var, float(count))
            self.calls[index] += 1
        self.samples += batch_size(inputs)
        self.batches += 1
        if self.batches == self.snapshot_at:
            self.snapshot = [estimator.result() for estimator in self.estimators]
            self.snapshot_samples = self.samples

    def _call(self, model: nn.Module, inputs: Inputs, dtype: torch.dtype | None) -> None:
        autocast = (
            torch.autocast(first_tensor(inputs).device.type, dtype=dtype)
            if dtype is not None
            else contextlib.nullcontext()
        )
        try:
            with autocast:
                self.call_fn(model, inputs)
        except ValueError as exc:
            if "Expected more than 1 value per channel" in str(exc):
                raise one_value_error("", 1, batch_size(inputs), self.max_batch) from exc
            raise

    def converged(self) -> bool:
        """Whether no estimate moved by more than ``tolerance`` over the last ``window`` batches."""
        if self.tolerance is None:
            return False
        self.history.append([estimator.result() for estimator in self.estimators])
        if len(self.history) <= self.window:
            return False
        if not estimates_converged(self.history[0], self.history[-1], self.tolerance):
            return False
        self.stopped_early = True
        return True

    def restore(self) -> None:
        """Every layer's statistics and counter back to their values before the run."""
        for layer, (mean, var), counter in zip(
            self.layers, self.source, self.source_counts, strict=True
        ):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            layer.module.num_batches_tracked.copy_(counter)

    def finish(self, prior_strength: float | str) -> Moved:
        """Write the estimates into the buffers; report layers that never updated.

        ``prior_strength``: N, or ``"auto"`` for an N per layer chosen from the data
        (:meth:`SampleMoments.source_weight`; scripted layers get
        :data:`SCRIPTED_PRIOR_STRENGTH`).

        ``num_batches_tracked`` becomes the number of calls measured (population/batch_mean
        restart the count as ``update_bn``'s reset does; ema continues it), as train-mode BN
        would count them.
        """
        if not any(self.updated):
            self.restore()
            raise StatisticsUnchangedError(
                "no BatchNorm layer updated its statistics in train mode: the model's graph "
                "fixes training=False (a traced TorchScript module does); script it with "
                "torch.jit.script or export it with torch.export instead of torch.jit.trace"
            )
        moved = Moved([], [], [])
        convergence = self._convergence()
        chosen: dict[str, float] = {}
        for index, layer in enumerate(self.layers):
            (old_mean, old_var), counter = self.source[index], self.source_counts[index]
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
            strength = self._layer_prior(index, prior_strength)
            chosen[layer.name] = strength
            mean = mix_with_prior(old_mean, mean, strength, self.samples)
            var = mix_with_prior(old_var, var, strength, self.samples)
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            calls = self.calls[index]
            layer.module.num_batches_tracked.copy_(counter + calls if self.kind == "ema" else calls)
            moved.layers.append(layer)
            moved.changes.append(_layer_change(layer, old_mean, old_var))
        if prior_strength == AUTO_PRIOR:
            median = sorted(chosen.values())[len(chosen) // 2] if chosen else 0.0
            moved.prior = PriorChoice(strength=median, chosen_by="auto", per_layer=chosen)
        else:
            moved.prior = PriorChoice(strength=float(prior_strength), chosen_by="fixed")
        moved.convergence = convergence
        return moved

    def _layer_prior(self, index: int, prior_strength: float | str) -> float:
        if prior_strength != AUTO_PRIOR:
            return float(prior_strength)
        if self.moments is None or self.moments[index].samples == 0:  # scripted: no hook
            return SCRIPTED_PRIOR_STRENGTH
        weight = self.moments[index].source_weight(self.source[index][1])
        return prior_strength_of(weight, self.samples)

    def _convergence(self) -> Convergence | None:
        """How far each layer's estimate moved between 3/4 of the batches and the end (in
        estimated stds, RMS over channels, the larger of mean and std); None under 4 batches."""
        if self.snapshot is None:
            return None
        per_layer: dict[str, float] = {}
        for layer, estimator, (old_mean, old_var), updated in zip(
            self.layers, self.estimators, self.snapshot, self.updated, strict=True
        ):
            if not updated:
                continue
            mean, var = estimator.result()
            std = var.double().clamp_min(1e-12).sqrt()
            mean_move = ((mean.double() - old_mean.double()) / std).square().mean().sqrt()
            std_move = ((std - old_var.double().clamp_min(1e-12).sqrt()) / std).square().mean()
            per_layer[layer.name] = float(torch.maximum(mean_move, std_move.sqrt()))
        return Convergence(
            last_quarter_change=max(per_layer.values()) if per_layer else None,
            samples_at_three_quarters=self.snapshot_samples,
            per_layer=per_layer,
        )


def _layer_change(layer: BNLayer, old_mean: torch.Tensor, old_var: torch.Tensor) -> LayerChange:
    return statistics_change(
        layer.name,
        layer.type_name,
        old_mean,
        old_var,
        layer.running_mean,
        layer.running_var,
        layer.eps,
    )


def estimates_converged(
    old: list[tuple[torch.Tensor, torch.Tensor]],
    new: list[tuple[torch.Tensor, torch.Tensor]],
    tolerance: float,
) -> bool:
    """Whether, between two snapshots of every layer's (mean, var) estimate, no channel's mean
    moved by more than ``tolerance`` new stds and no channel's std by more than that fraction."""
    for (old_mean, old_var), (new_mean, new_var) in zip(old, new, strict=True):
        std = new_var.clamp_min(1e-12).sqrt()
        mean_move = ((new_mean - old_mean).abs() / std).max()
        std_move = ((std - old_var.clamp_min(1e-12).sqrt()).abs() / std).max()
        if float(torch.maximum(mean_move, std_move)) > tolerance:
            return False
    return True


def statistics_change(
    name: str,
    type_name: str,
    old_mean: torch.Tensor,
    old_var: torch.Tensor,
    new_mean: torch.Tensor,
    new_var: torch.Tensor,
    eps: float,
) -> LayerChange:
    """How one layer's running statistics moved (see :class:`LayerChange`)."""
    new_mean, new_var = new_mean.double(), new_var.double()
    old_mean, old_var = old_mean.double(), old_var.double()
    shift = (new_mean - old_mean) / (old_var + eps).sqrt()
    ratio = (new_var.clamp_min(1e-12) / old_var.clamp_min(1e-12)).log().mean().exp()
    return LayerChange(
        name=name,
        type=type_name,
        channels=int(new_mean.numel()),
        mean_shift_std=float(shift.square().mean().sqrt()),
        var_ratio=float(ratio) if math.isfinite(float(ratio)) else 0.0,
    )
