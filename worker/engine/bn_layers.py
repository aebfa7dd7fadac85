"""Finding the BatchNorm layers of a model, and reading their statistics one batch at a time.

Touched: ``torch.nn.modules.batchnorm._BatchNorm`` and its subclasses (BatchNorm1d/2d/3d,
materialized LazyBatchNorm*, SyncBatchNorm, timm's BatchNormAct2d, ...) and TorchScript modules
compiled from such a class (``original_name`` ending in ``BatchNorm1d/2d/3d`` or any scripted
module holding ``running_mean``/``running_var``/``num_batches_tracked`` buffers). Skipped, and
reported with the reason: ``track_running_stats=False`` layers, frozen BN (torchvision's
``FrozenBatchNorm2d`` and look-alikes, whose statistics are constants) and unmaterialized lazy BN.
Refused: a scripted layer with ``momentum=0`` (converted models ship so), whose buffers never take
a batch's statistics and whose momentum is a constant of the compiled code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedBuffer

from recalib.errors import InvalidModelError
from worker.engine.results import SkippedLayer


@dataclass
class BNLayer:
    """One recalibratable BN layer.

    ``scripted`` layers (TorchScript) accept neither hooks nor a new momentum, so their batch
    statistics are read by zeroing the buffers before a forward pass and scaling them after
    (:meth:`prepare`/:meth:`read`), which measures one call per forward only; eager layers run
    with momentum 1 and are read by a forward hook after every call.
    """

    name: str
    module: nn.Module
    scripted: bool
    channels: int
    eps: float
    momentum: float | None
    hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list, repr=False)

    @property
    def type_name(self) -> str:
        return _type_name(self.module)

    @property
    def running_mean(self) -> torch.Tensor:
        return self.module.running_mean

    @property
    def running_var(self) -> torch.Tensor:
        return self.module.running_var

    def prepare(self) -> None:
        """Before a forward pass: make the next buffer update equal the batch statistics."""
        if self.scripted:
            self.module.running_mean.zero_()
            self.module.running_var.zero_()
            self.module.num_batches_tracked.zero_()

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """After a call: its per-channel batch mean and unbiased variance (copies)."""
        mean, var = self.module.running_mean, self.module.running_var
        if self.scripted and self.momentum is not None:
            # running = (1 - m) * 0 + m * batch, so batch = running / m
            return mean / self.momentum, var / self.momentum
        return mean.clone(), var.clone()


def _type_name(module: nn.Module) -> str:
    if isinstance(module, torch.jit.ScriptModule):
        return getattr(module, "original_name", type(module).__name__)
    return type(module).__name__


def _is_scripted_bn(module: nn.Module) -> bool:
    if not isinstance(module, torch.jit.ScriptModule):
        return False
    buffers = dict(module.named_buffers(recurse=False))
    return {"running_mean", "running_var"} <= buffers.keys() or _type_name(module).endswith(
        ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNorm")
    )


def _skip_reason(module: nn.Module) -> str | None:
    type_name = _type_name(module)
    if "Frozen" in type_name:
        return "frozen BN: its statistics are constants, not running estimates"
    running_mean = getattr(module, "running_mean", None)
    if isinstance(running_mean, UninitializedBuffer):
        return "lazy BN not materialized yet: run one forward pass before recalibrating"
    if not getattr(module, "track_running_stats", True) or running_mean is None:
        return "track_running_stats=False: it normalizes with batch statistics at inference"
    if getattr(module, "num_batches_tracked", None) is None:
        return "no num_batches_tracked buffer: cannot tell whether its statistics moved"
    return None


def find_bn_layers(model: nn.Module) -> tuple[list[BNLayer], list[SkippedLayer]]:
    """All BN layers of ``model`` that can be recalibrated, and those that cannot (with why).

    Raises:
        InvalidModelError: TorchScript BN layers with ``momentum=0``, named (see
            :func:`refuse_zero_momentum`).
    """
    layers: list[BNLayer] = []
    skipped: list[SkippedLayer] = []
    for name, module in model.named_modules():
        scripted = _is_scripted_bn(module)
        looks_frozen = "FrozenBatchNorm" in type(module).__name__
        if not (isinstance(module, _BatchNorm) or scripted or looks_frozen):
            continue
        reason = _skip_reason(module)
        if reason is not None:
            skipped.append(SkippedLayer(name=name, type=_type_name(module), reason=reason))
            continue
        layers.append(
            BNLayer(
                name=name,
                module=module,
                scripted=scripted,
                channels=int(module.running_mean.numel()),
                eps=float(getattr(module, "eps", 1e-5)),
                momentum=getattr(module, "momentum", 0.1),
            )
        )
    refuse_zero_momentum(layers)
    return layers, skipped


def refuse_zero_momentum(layers: list[BNLayer]) -> None:
    """Raise :class:`InvalidModelError` naming the scripted layers with ``momentum=0``.

    A scripted layer is read from its buffers after a train-mode call (:meth:`BNLayer.read`):
    ``running = (1 - m)·running + m·batch``, which at ``m = 0`` never shows the batch. Eager and
    ``.pt2`` layers are run at momentum 1 instead; TorchScript compiles momentum in as a constant
    ("Can't set constant 'momentum'"), so the model itself has to change.
    """
    frozen = [layer.name for layer in layers if layer.scripted and layer.momentum == 0]
    if not frozen:
        return
    shown = ", ".join(repr(name) for name in frozen[:10])
    more = f" and {len(frozen) - 10} more" if len(frozen) > 10 else ""
    raise InvalidModelError(
        f"TorchScript BatchNorm layer(s) {shown}{more} have momentum=0.0, a constant of the "
        "scripted model: their running statistics never take a batch's statistics, so they "
        "cannot be re-estimated; set momentum to None or a value in (0, 1] on those layers "
        "before torch.jit.script, or recalibrate the eager model or a torch.export .pt2 program "
        "instead"
    )


def probe_elements_per_sample(
    layers: list[BNLayer],
    forward: Callable[[Any], None],
    probes: tuple[Any, Any],
    samples: int,
) -> list[int]:
    """Elements per channel per sample of each scripted BN layer (no hooks on TorchScript).

    A batch X and its duplicate [X; X] have the same biased variance b, so their unbiased
    variances u1 = b·n/(n−1) and u2 = b·2n/(2n−1) give n = (2u1 − u2) / (2(u1 − u2)). Assumes the
    spatial size at each layer is the same for every batch (fixed input size). Where u1 ≈ u2
    (n too large to resolve in float32) the Bessel correction is negligible and n is taken large.
    ``forward`` runs the model in calibration mode on a batch; ``probes`` are the inputs X (of
    ``samples`` samples) and [X; X].
    """
    reads = []
    for probe in probes:
        for layer in layers:
            layer.prepare()
        forward(probe)
        reads.append([tuple(t.double() for t in layer.read()) for layer in layers])
    counts = []
    for (_, u1), (_, u2) in zip(reads[0], reads[1], strict=True):
        valid = (u1 - u2).abs() > 1e-5 * u1.abs()
        if not bool(valid.any()):
            counts.append(1_000_000)
            continue
        n = ((2 * u1 - u2) / (2 * (u1 - u2)))[valid].median()
        counts.append(max(1, round(float(n) / samples)))
    return counts
