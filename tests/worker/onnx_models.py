"""ONNX models for the tests, and the torch BN oracle they are checked against.

The oracle runs torch's own BatchNorm kernel: a copy of the torch model with only its BN layers in
train mode, fed the calibration batches (``population``: the pooled statistics of
:mod:`tests.bn_oracle`; ``batch_mean``: BN with ``momentum=None`` after a reset, as
``torch.optim.swa_utils.update_bn``; ``ema``: BN with the momentum, from the source statistics).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tests.bn_oracle import pooled_statistics, with_statistics


def export_legacy(model: nn.Module, args: tuple, path: Path, *, opset: int, dynamic: bool = True,
                  input_names: Sequence[str] = ("x",)) -> Path:  # fmt: skip
    """torch's TorchScript-based exporter with BN kept (training=PRESERVE, no constant folding)."""
    axes = {name: {0: "batch"} for name in input_names} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(path), dynamo=False, opset_version=opset,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
            input_names=list(input_names), dynamic_axes=axes,
        )  # fmt: skip
    return path


def export_dynamo(
    model: nn.Module, args: tuple, path: Path, *, optimize: bool = False, external: bool = False
) -> Path:
    """torch's torch.export-based exporter (BN kept with ``optimize=False``), dynamic batch."""
    shapes = tuple({0: torch.export.Dim("batch", min=2)} for _ in args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(path), dynamo=True, optimize=optimize, dynamic_shapes=shapes,
            external_data=external, verbose=False,
        )  # fmt: skip
    return path


def torch_oracle(
    model: nn.Module,
    forward: Callable[[nn.Module, torch.Tensor], object],
    order: Sequence[int],
    batch_size: int,
    estimator: str,
    momentum: float = 0.1,
    prior_strength: float = 0.0,
) -> nn.Module:
    """``model`` with the statistics torch's BN computes on the batches (module docstring)."""
    source = copy.deepcopy(model).eval()
    samples = len(order)
    if estimator == "population":
        statistics = pooled_statistics(source, forward, order, batch_size)
        oracle = with_statistics(source, statistics)
    else:
        oracle = copy.deepcopy(source)
        for module in oracle.modules():
            if isinstance(module, _BatchNorm):
                module.train()
                if estimator == "batch_mean":
                    module.reset_running_stats()
                    module.momentum = None
                else:
                    module.momentum = momentum
        with torch.no_grad():
            for idx in torch.as_tensor(list(order)).split(batch_size):
                forward(oracle, idx)
        oracle.eval()
    if prior_strength > 0:
        weight = prior_strength / (prior_strength + samples)
        sources = dict(source.named_modules())
        for name, module in oracle.named_modules():
            if isinstance(module, _BatchNorm):
                old = sources[name]
                module.running_mean.mul_(1 - weight).add_(old.running_mean * weight)
                module.running_var.mul_(1 - weight).add_(old.running_var * weight)
    return oracle


class GemmBN(nn.Module):
    """The torch twin of :func:`gemm_bn_graph`: Linear then BatchNorm1d on (N, C)."""

    def __init__(self, features: int = 64, channels: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(features, channels)
        self.bn = nn.BatchNorm1d(channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


def gemm_bn_graph(twin: GemmBN, opset: int) -> onnx.ModelProto:
    """A graph written with ``onnx.helper`` (not by torch): Gemm (transB) then BN on (N, C)."""
    linear, bn = twin.linear, twin.bn

    def init(name: str, tensor: torch.Tensor) -> TensorProto:
        return numpy_helper.from_array(tensor.detach().numpy().astype(np.float32), name)

    features, channels = linear.in_features, linear.out_features
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="dense", transB=1),
            helper.make_node(
                "BatchNormalization",
                ["h", "gamma", "beta", "mu", "sigma2"],
                ["y"],
                name="dense_bn",
                epsilon=bn.eps,
            ),
        ],
        "gemm_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels])],
        [
            init("W", linear.weight),
            init("b", linear.bias),
            init("gamma", bn.weight),
            init("beta", bn.bias),
            init("mu", bn.running_mean),
            init("sigma2", bn.running_var),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="hand-written"
    )
    model.ir_version = 7 if opset < 15 else 8
    helper.set_model_props(model, {"author": "tests", "purpose": "gemm-bn"})
    onnx.checker.check_model(model)
    return model


class TwoInputNet(nn.Module):
    """Two inputs: ``signal`` (N, 3, L) → Conv1d-BN1d; ``volume`` (N, 2, D, H, W) → Conv3d-BN3d;
    pooled, concatenated, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(6)
        self.conv3 = nn.Conv3d(2, 4, 3, padding=1)
        self.bn3 = nn.BatchNorm3d(4)
        self.head = nn.Linear(10, 5)

    def forward(self, signal: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(self.conv1(signal))).mean(dim=2)
        b = torch.relu(self.bn3(self.conv3(volume))).mean(dim=(2, 3, 4))
        return self.head(torch.cat([a, b], dim=1))


def bn_if_graph() -> onnx.ModelProto:
    """A BN node inside an ``If`` branch (a subgraph), named ``branch_bn``."""
    c = 2
    inits = [numpy_helper.from_array(np.ones(c, np.float32), n) for n in ("g", "v")]
    inits += [numpy_helper.from_array(np.zeros(c, np.float32), n) for n in ("bb", "m")]
    bn = helper.make_node("BatchNormalization", ["x", "g", "bb", "m", "v"], ["t"], name="branch_bn")
    then = helper.make_graph(
        [bn],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )  # fmt: skip
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"], name="pass")],
        "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )  # fmt: skip
    choose = helper.make_node(
        "If", ["flag"], ["y"], name="choose", then_branch=then, else_branch=other
    )
    graph = helper.make_graph(
        [choose],
        "if_bn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model
