"""Folding BatchNorm into the conv/linear layer before it, for deployment.

One FX pass (:func:`fold_graph`) serves eager models (traced with ``torch.fx.symbolic_trace``:
producers are ``nn.Conv1d/2d/3d``/``nn.Linear`` modules) and ``.pt2`` programs (the rewritten
graph of :mod:`worker.formats.export_program`: producers are ``aten.conv*``/``aten.linear`` calls
on ``get_attr`` weights). A BN is folded when it is in eval mode with running statistics, its input
is such a producer's output, and that output feeds nothing else; the producer's weight and bias
are rescaled (``torch.nn.utils.fusion``) and the BN disappears. Every other BN is listed with the
reason. TorchScript models are folded by ``torch.jit.freeze`` instead.

Saving the result is :func:`worker.fold_export.save_folded`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import (
    fuse_conv_bn_eval,
    fuse_conv_bn_weights,
    fuse_linear_bn_eval,
    fuse_linear_bn_weights,
)

from recalib.contract import SkippedLayer
from worker.formats.export_program import fetch_attr
from worker.formats.models import LoadedModel

_aten = torch.ops.aten
_CONV_OPS = {_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default}
_FOLDABLE_CALLS = {*_CONV_OPS, _aten.convolution.default, _aten.linear.default}
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class FoldResult:
    """A new module with BN folded away, how many were folded, and the others with reasons."""

    module: nn.Module
    folded: int
    not_folded: list[SkippedLayer]


def fold_batchnorm(loaded: LoadedModel) -> FoldResult:
    """Fold every BN that directly follows a conv/linear into it; ``loaded`` stays unchanged."""
    if isinstance(loaded.module, torch.jit.ScriptModule):
        return _fold_scripted(loaded.module)
    module = copy.deepcopy(loaded.module)
    if isinstance(module, fx.GraphModule):
        graph_module = module
    else:
        try:
            graph_module = fx.symbolic_trace(module)
        except Exception as exc:
            reason = f"model not traceable by torch.fx: {first_line(exc)}"
            skipped = [
                SkippedLayer(name=n, type=type(m).__name__, reason=reason) for n, m in _bns(module)
            ]
            return FoldResult(module, 0, skipped)
    folded, skipped = fold_graph(graph_module)
    return FoldResult(graph_module.train(loaded.module.training), folded, skipped)


def fold_graph(gm: fx.GraphModule) -> tuple[int, list[SkippedLayer]]:
    """Fold BN call_module nodes into their producers, in place; (folded, not folded)."""
    modules = dict(gm.named_modules())
    folded, skipped = 0, []
    for node in list(gm.graph.nodes):
        bn = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(bn, _BatchNorm):
            continue
        reason = _fold_one(gm, node, bn, modules)
        if reason is None:
            folded += 1
        else:
            skipped.append(
                SkippedLayer(name=str(node.target), type=type(bn).__name__, reason=reason)
            )
    for node in list(gm.graph.nodes):  # reads of the folded BNs' buffers, now unused
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return folded, skipped


def _fold_one(
    gm: fx.GraphModule, node: fx.Node, bn: _BatchNorm, modules: dict[str, nn.Module]
) -> str | None:
    """Fold one BN node; the reason it cannot be folded, or None once done."""
    if bn.training:
        return "in training mode"
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (track_running_stats=False)"
    producer = node.args[0] if node.args else None
    if not isinstance(producer, fx.Node):
        return "its input is not a graph value"
    what = _describe(producer, modules)
    if len(producer.users) > 1:
        return f"the {what} output also feeds {len(producer.users) - 1} other node(s)"
    if producer.op == "call_module":
        reason = _fold_into_module(gm, producer, bn, modules, what)
    elif producer.op == "call_function" and producer.target in _FOLDABLE_CALLS:
        reason = _fold_into_call(gm, producer, bn)
    else:
        return f"follows {what}, not a conv/linear"
    if reason is None:
        node.replace_all_uses_with(producer)
        gm.graph.erase_node(node)
    return reason


def _fold_into_module(
    gm: fx.GraphModule, producer: fx.Node, bn: _BatchNorm, modules: dict[str, nn.Module], what: str
) -> str | None:
    target = str(producer.target)
    layer = modules[target]
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)
    if calls > 1:
        return f"the {type(layer).__name__} {target} is called {calls} times"
    if isinstance(layer, _CONV_MODULES) and layer.out_channels == bn.num_features:
        fused: nn.Module = fuse_conv_bn_eval(layer, bn)
    elif isinstance(layer, nn.Linear) and layer.out_features == bn.num_features:
        fused = fuse_linear_bn_eval(layer, bn)
    elif isinstance(layer, (*_CONV_MODULES, nn.Linear)):
        return f"channel count of {target} does not match"
    else:
        return f"follows {what}, not a conv/linear"
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, fused)
    modules[target] = fused
    return None


def _fold_into_call(gm: fx.GraphModule, producer: fx.Node, bn: _BatchNorm) -> str | None:
    args: list[Any] = list(producer.args)
    is_linear = producer.target is _aten.linear.default
    if producer.target is _aten.convolution.default and args[6]:
        return "follows a transposed convolution"
    weight: Any = args[1]
    bias: Any = args[2] if len(args) > 2 else producer.kwargs.get("bias")
    if (
        producer.kwargs
        or not _own_attr(weight, producer)
        or (bias is not None and not _own_attr(bias, producer))
    ):
        return "the conv/linear weights are shared or computed"
    rank = getattr(producer.meta.get("val"), "ndim", None)
    if is_linear and rank not in (None, 2):
        return f"follows a linear layer with {rank}-D output"
    w = fetch_attr(gm, str(weight.target))
    b = fetch_attr(gm, str(bias.target)) if bias is not None else None
    channels = w.shape[0]
    if channels != bn.num_features:
        return "channel count does not match"
    fuse: Any = fuse_linear_bn_weights if is_linear else fuse_conv_bn_weights
    new_w, new_b = fuse(w, b, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    base = str(weight.target).replace(".", "_")
    with gm.graph.inserting_before(producer):
        args[1] = gm.graph.get_attr(_register(gm, f"{base}_folded", new_w))
        bias_node = gm.graph.get_attr(_register(gm, f"{base}_folded_bias", new_b))
    args = [*args, None][:3] if len(args) < 3 else args
    args[2] = bias_node
    producer.args = tuple(args)
    for old in (weight, bias):
        if isinstance(old, fx.Node) and not old.users:
            gm.graph.erase_node(old)
    return None


def _own_attr(value: Any, producer: fx.Node) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr" and len(value.users) == 1


def _register(gm: fx.GraphModule, base: str, value: torch.Tensor) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    gm.register_parameter(name, nn.Parameter(value.detach(), requires_grad=False))
    return name


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[str(node.target)]).__name__})"
    if node.op == "placeholder":
        return "the model input"
    name = getattr(node.target, "__name__", str(node.target))
    return str(name).split(".")[0]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (300 characters at most), else its type."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _bns(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, _BatchNorm)]


def _fold_scripted(module: torch.jit.ScriptModule) -> FoldResult:
    """``torch.jit.freeze`` folds conv-BN (and linear-BN) itself; count what is left."""
    before = module.inlined_graph.findAllNodes("aten::batch_norm")  # type: ignore[attr-defined]
    training = module.training
    module.eval()
    try:
        frozen = torch.jit.freeze(module)
    finally:
        module.train(training)
    remaining = frozen.graph.findAllNodes("aten::batch_norm")  # type: ignore[attr-defined]
    skipped: list[SkippedLayer] = []
    for node in remaining:
        mean_input = node.inputsAt(3)
        is_constant = mean_input.node().kind() == "prim::Constant"
        mean = mean_input.toIValue() if is_constant else None
        name, kind = _scripted_layer(module, mean) or (
            f"batch_norm #{len(skipped) + 1}",
            "BatchNorm",
        )
        reason = "not directly after a conv/linear (torch.jit.freeze kept it)"
        skipped.append(SkippedLayer(name=name, type=kind, reason=reason))
    return FoldResult(frozen, max(0, len(before) - len(remaining)), skipped)


def _scripted_layer(module: torch.jit.ScriptModule, mean: Any) -> tuple[str, str] | None:
    """(name, type) of the BN submodule whose running mean equals a frozen constant."""
    if not isinstance(mean, torch.Tensor):
        return None
    for name, sub in module.named_modules():
        running = getattr(sub, "running_mean", None)
        if (
            isinstance(running, torch.Tensor)
            and running.shape == mean.shape
            and torch.equal(running, mean)
        ):
            return name, getattr(sub, "original_name", type(sub).__name__)
    return None
