"""Fold an ONNX model's BatchNormalization nodes into the ``Conv``/``Gemm`` before them.

:func:`fold_bn_nodes` returns a copy in which each BN that reads a ``Conv`` or ``Gemm`` output
that nothing else reads is gone: with ``s = scale / sqrt(var + eps)`` per channel, the weight's
output channels are scaled by ``s`` and the bias becomes ``(bias - mean) * s + B``; the producer
then writes the BN's output name, so every reader (and the graph outputs) stays wired. A bias
the graph computes (torch's dynamo exporter writes a bias-less Conv's zero bias as an ``Expand``)
is rescaled by a ``Mul`` and an ``Add`` inserted before the producer, which ONNX Runtime folds
into constants when it loads the model. A BN that
does not fit (another producer, a weight or output read elsewhere, a ``Gemm`` with
``beta != 1``) is left in the graph and listed with the reason. ``Identity`` nodes that only fed
a removed BN are removed with it. Only the top graph is walked (BN nodes in subgraphs are refused
earlier, :func:`worker.onnx.graph.find_bn_nodes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from recalib.contract import SkippedLayer
from worker.onnx.graph import BN_OP, BNNode, find_bn_nodes
from worker.onnx.load import walk_nodes

FOLDABLE_OPS = ("Conv", "Gemm")
SHAPE_OPS = ("Shape", "Size")
"""Operators that read only a tensor's shape: a weight they read may still be rescaled."""


@dataclass
class OnnxFold:
    """The folded copy, the names of the BN nodes folded, and those left with why."""

    model: onnx.ModelProto
    folded: list[str]
    not_folded: list[SkippedLayer]


def fold_bn_nodes(model: onnx.ModelProto, name: str) -> OnnxFold:
    """A copy of ``model`` with every foldable BN node folded (see the module docstring);
    ``model`` is unchanged. ``name`` names the model in errors."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    nodes, _ = find_bn_nodes(result, name)
    graph = result.graph
    folded: list[str] = []
    not_folded: list[SkippedLayer] = []
    removed: set[int] = set()
    before: dict[int, list[onnx.NodeProto]] = {}  # producer's index -> nodes to run before it
    for bn in nodes:
        reason = _fold_one(graph, bn, before)
        if reason is None:
            folded.append(bn.name)
            removed.add(bn.index)
        else:
            not_folded.append(SkippedLayer(name=bn.name, type=BN_OP, reason=reason))
    kept = []
    for index, node in enumerate(graph.node):
        kept.extend(before.get(index, []))
        if index not in removed:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(_without_dead_identities(graph, kept))
    _drop_unread_initializers(graph)
    return OnnxFold(result, folded, not_folded)


def _readers(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        for value in node.input:
            counts[value] = counts.get(value, 0) + 1
    for output in graph.output:
        counts[output.name] = counts.get(output.name, 0) + 1
    return counts


def _fold_one(
    graph: onnx.GraphProto, bn: BNNode, before: dict[int, list[onnx.NodeProto]]
) -> str | None:
    """Fold ``bn`` into its producer in place (nodes a computed bias needs go to ``before``);
    None when done, else why not (nothing changed)."""
    producers = {out: index for index, node in enumerate(graph.node) for out in node.output}
    producer_index = producers.get(bn.input)
    producer = graph.node[producer_index] if producer_index is not None else None
    if producer is None or producer.op_type not in FOLDABLE_OPS or producer.domain not in ("",):
        return "not after a Conv or Gemm"
    readers = _readers(graph)
    if readers.get(bn.input, 0) != 1:
        return f"the {producer.op_type}'s output is read by other nodes too"
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    weight_name = producer.input[1]
    bias_name = producer.input[2] if len(producer.input) > 2 and producer.input[2] else None
    if weight_name not in initializers:
        return f"the {producer.op_type}'s weight is computed, not stored"
    computed_bias = bool(bias_name) and bias_name not in initializers
    # readers of the weight's shape only (the dynamo exporter's Shape for a zero bias) are
    # unaffected by new values
    shape_readers = sum(
        value == weight_name for node in graph.node if node.op_type in SHAPE_OPS
        for value in node.input
    )  # fmt: skip
    if readers.get(weight_name, 0) - shape_readers != 1 or (
        bias_name and readers.get(bias_name, 0) != 1
    ):
        return f"the {producer.op_type}'s weight or bias is shared with other nodes"
    bn_node = graph.node[bn.index]
    if any(value not in initializers for value in bn_node.input[1:3]):
        return "its scale or bias is computed, not stored"
    attributes = {a.name: helper.get_attribute_value(a) for a in producer.attribute}
    if producer.op_type == "Gemm" and attributes.get("beta", 1.0) != 1.0 and bias_name:
        return "a Gemm with beta != 1"
    weight = numpy_helper.to_array(initializers[weight_name])
    scale = numpy_helper.to_array(initializers[bn_node.input[1]]).astype(np.float64)
    shift = numpy_helper.to_array(initializers[bn_node.input[2]]).astype(np.float64)
    mean = numpy_helper.to_array(initializers[bn.mean.initializer]).astype(np.float64)
    var = numpy_helper.to_array(initializers[bn.var.initializer]).astype(np.float64)
    factor = scale / np.sqrt(var + bn.epsilon)
    out_axis = 0
    if producer.op_type == "Gemm" and not attributes.get("transB", 0):
        out_axis = 1
    if weight.shape[out_axis] != bn.channels:
        return f"the {producer.op_type}'s {weight.shape[out_axis]} outputs are not its channels"
    shape = [1] * weight.ndim
    shape[out_axis] = bn.channels
    new_weight = (weight.astype(np.float64) * factor.reshape(shape)).astype(weight.dtype)
    bias = (
        numpy_helper.to_array(initializers[bias_name]).astype(np.float64)
        if bias_name and not computed_bias
        else np.zeros(bn.channels)
    )
    new_bias = ((bias - mean) * factor + shift).astype(weight.dtype)
    initializers[weight_name].CopyFrom(numpy_helper.from_array(new_weight, weight_name))
    if computed_bias:  # bias' = bias * factor + new_bias, computed where the bias was
        names = [_unused(f"{bn.name}.fold_{part}", initializers) for part in ("scale", "shift")]
        graph.initializer.extend([
            numpy_helper.from_array(factor.astype(weight.dtype), names[0]),
            numpy_helper.from_array(new_bias, names[1]),
        ])  # fmt: skip
        scaled, folded = f"{bn.name}.fold_scaled", f"{bn.name}.fold_bias"
        before.setdefault(producer_index, []).extend([
            helper.make_node("Mul", [bias_name, names[0]], [scaled], name=f"{bn.name}.fold_mul"),
            helper.make_node("Add", [scaled, names[1]], [folded], name=f"{bn.name}.fold_add"),
        ])  # fmt: skip
        producer.input[2] = folded
    elif bias_name:
        initializers[bias_name].CopyFrom(numpy_helper.from_array(new_bias, bias_name))
    else:
        own = _unused(f"{bn.name}.folded_bias", initializers)
        graph.initializer.append(numpy_helper.from_array(new_bias, own))
        while len(producer.input) < 3:
            producer.input.append("")
        producer.input[2] = own
        if producer.op_type == "Gemm":  # a C input of its own now: beta must be 1 for it
            kept = [a for a in producer.attribute if a.name != "beta"]
            del producer.attribute[:]
            producer.attribute.extend([*kept, helper.make_attribute("beta", 1.0)])
    producer.output[0] = bn.output
    return None


def _unused(name: str, taken: dict[str, onnx.TensorProto]) -> str:
    while name in taken:
        name += "_"
    return name


def _read_values(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> set[str]:
    """Values read by ``nodes`` (and their subgraphs, which may read outer names) or output."""
    read = {output.name for output in graph.output}
    for node in nodes:
        holder = onnx.GraphProto()
        holder.node.append(node)
        read.update(value for inner, _ in walk_nodes(holder) for value in inner.input)
    return read


def _without_dead_identities(
    graph: onnx.GraphProto, nodes: list[onnx.NodeProto]
) -> list[onnx.NodeProto]:
    """``nodes`` less the ``Identity`` nodes whose output nothing reads any more."""
    while True:
        read = _read_values(graph, nodes)
        alive = [n for n in nodes if n.op_type != "Identity" or n.output[0] in read]
        if len(alive) == len(nodes):
            return alive
        nodes = alive


def _drop_unread_initializers(graph: onnx.GraphProto) -> None:
    """Initializers nothing reads any more (a folded BN's), and their graph-input entries
    (older exporters list initializers as inputs too)."""
    read = _read_values(graph, list(graph.node))
    dropped = {tensor.name for tensor in graph.initializer if tensor.name not in read}
    kept = [tensor for tensor in graph.initializer if tensor.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [value for value in graph.input if value.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)
