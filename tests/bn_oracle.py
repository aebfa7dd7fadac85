"""What a recalibration job must produce, computed in the test without ``worker.engine``.

The ``population`` estimator's contract (README, ``recalib.contract.Estimator``): each BN layer's
new running mean and unbiased variance are the pooled statistics of that layer's inputs over every
calibration sample, fed in the job's calibration batches with only the BN layers in train mode (they
normalise with batch statistics; Dropout stays off). Here torch's own BN layers run that forward
pass and forward pre-hooks collect their inputs. Accuracies of the oracle model are then the
reference for a job's ``after`` numbers on any machine: the tests compare against them instead of
against absolute accuracies, which depend on the model a machine trained.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from recalib.contract import JobOptions
from worker.digits import DigitsNet
from worker.formats.data import open_samples
from worker.splits import plan_data

Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""BN layer name → (running mean, unbiased running variance), float64."""


def digits_net(pt2_path: Path) -> DigitsNet:
    """The :class:`DigitsNet` (an eager module, which takes hooks) with a ``.pt2``'s weights."""
    net = DigitsNet()
    net.load_state_dict(torch.export.load(pt2_path).state_dict)
    return net.eval()


def calibration_order(
    calibration_path: Path, eval_path: Path | None, options: JobOptions | None = None
) -> list[int]:
    """The calibration sample indices of a job, in its calibration order (its seeded plan)."""
    eval_set = open_samples(eval_path) if eval_path is not None else None
    plan = plan_data(open_samples(calibration_path), eval_set, options or JobOptions())
    return plan.calibration_indices


def pooled_bn_statistics(
    model: nn.Module, inputs: torch.Tensor, order: Sequence[int], batch_size: int
) -> Statistics:
    """Pooled per-channel mean / unbiased variance of every BN layer's input (see module doc)."""
    return pooled_statistics(model, lambda net, idx: net(inputs[idx]), order, batch_size)


def pooled_statistics(
    model: nn.Module,
    forward: Callable[[nn.Module, torch.Tensor], object],
    order: Sequence[int],
    batches: int | Sequence[int],
) -> Statistics:
    """Pooled per-channel mean / unbiased variance of every BN layer's input over the batches of
    ``order`` (``batches``: their size, or the size of each), each fed by ``forward(model,
    indices)`` to a copy of ``model`` with only its BN layers in train mode."""
    model = copy.deepcopy(model).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            module.train()
            handles.append(module.register_forward_pre_hook(partial(_collect, seen, name)))
    try:
        with torch.no_grad():
            for idx in torch.as_tensor(list(order)).split(batches):
                forward(model, idx)
    finally:
        for handle in handles:
            handle.remove()
    pooled = {name: torch.cat(chunks, dim=1) for name, chunks in seen.items()}
    return {name: (x.mean(1), x.var(1)) for name, x in pooled.items()}


def _collect(seen: dict[str, list[torch.Tensor]], name: str, module: nn.Module, args) -> None:
    x = args[0].detach().double()
    seen.setdefault(name, []).append(x.transpose(0, 1).reshape(x.shape[1], -1))


def with_statistics(model: nn.Module, statistics: Statistics) -> nn.Module:
    """A copy of ``model`` in eval mode whose BN running statistics are ``statistics``."""
    oracle = copy.deepcopy(model).eval()
    for name, (mean, var) in statistics.items():
        bn = oracle.get_submodule(name)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return oracle


def assert_statistics_equal(model: nn.Module, statistics: Statistics) -> None:
    """``model``'s BN running statistics equal ``statistics`` up to float32 rounding."""
    buffers = dict(model.named_buffers())
    for name, (mean, var) in statistics.items():
        torch.testing.assert_close(
            buffers[f"{name}.running_mean"].double(), mean, rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            buffers[f"{name}.running_var"].double(), var, rtol=1e-4, atol=1e-5
        )


def digits_oracle(
    model_path: Path, calibration_path: Path, eval_path: Path | None
) -> tuple[DigitsNet, nn.Module, Statistics]:
    """For a digits job with default options: the source model, the oracle and its statistics."""
    source = digits_net(model_path)
    order = calibration_order(calibration_path, eval_path)
    inputs = torch.from_numpy(np.load(calibration_path)["inputs"])
    statistics = pooled_bn_statistics(source, inputs, order, JobOptions().batch_size)
    return source, with_statistics(source, statistics), statistics


def one_sample(labels: np.ndarray) -> float:
    """The accuracy step of one sample (plus float slack): the tolerance between two models'
    accuracies that agree up to one borderline prediction (float32 rounding, batch sizes)."""
    return 1.0 / len(labels) + 1e-9
