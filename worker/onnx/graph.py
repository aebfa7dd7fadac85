"""The BatchNormalization nodes of an ONNX graph, and the rewrite that measures their statistics.

:func:`find_bn_nodes` finds every ``BatchNormalization`` node whose running mean and variance are
stored (an initializer, directly or through ``Identity`` nodes, as torch's legacy exporter
shares equal tensors). :func:`statistics_graph` returns a rewritten copy in which each of those
nodes normalizes with its batch's statistics, as train-mode BN does in torch (so downstream BNs
see what they would see in the torch engine): ``ReduceMean`` and ``ReduceSumSquare`` compute
them and feed the node's own mean/variance inputs (an inference-mode BN, which every execution
provider runs), or, with ``training_bn``, the node itself runs in training mode (one fused kernel
on ONNX Runtime's CPU provider). It exposes per batch:

- ``<prefix>mean``: per-channel mean, shape ``(C,)``;
- ``<prefix>var``: per-channel *biased* variance (what normalizes), shape ``(C,)``;
- ``<prefix>size``: the element count of the node's input (int64 scalar): ``size / C`` values per
  channel, from which the unbiased variance torch stores follows.

The rewrite reshapes the input to ``(N, C, -1)``, so ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``
and ``(N, C, D, H, W)`` inputs, fixed or dynamic, take the same nodes. Float16/bfloat16 inputs are
measured in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from recalib.errors import InvalidModelError, NoBatchNormError
from worker.engine.results import SkippedLayer
from worker.onnx.load import default_opset, walk_nodes

BN_OP = "BatchNormalization"

FOLDED_ADVICE = (
    "its BatchNorm was probably folded into the preceding Conv/Gemm by the exporter or an "
    "optimizer. Export with BN kept: PyTorch's torch.onnx.export(model, args, dynamo=True, "
    "optimize=False), or the legacy exporter torch.onnx.export(model, args, dynamo=False, "
    "training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False); tf2onnx: convert "
    "without its optimizers (python -m tf2onnx.convert ... with the BN layers kept, e.g. "
    "--optimizers '' or tf2onnx.convert.from_keras(..., optimizers={})), and run no onnxsim/"
    "onnxoptimizer fuse_bn pass"
)
"""What a ``no-batchnorm`` error for an ONNX model says after ``model has no ...: ``."""


@dataclass(frozen=True)
class StatSlot:
    """Where a BN node's running mean or variance is stored: ``initializer``, read as input
    ``input`` of node ``node`` (the BN itself, or the ``Identity`` that reads the initializer)."""

    initializer: str
    node: int
    input: int


@dataclass(frozen=True)
class BNNode:
    """One recalibratable ``BatchNormalization`` node (``index`` into ``graph.node``)."""

    index: int
    name: str
    input: str
    output: str
    channels: int
    epsilon: float
    mean: StatSlot
    var: StatSlot


def node_name(node: onnx.NodeProto, index: int) -> str:
    """A node's name, or ``<op>_<index>`` for an unnamed node (names are optional in ONNX)."""
    return node.name or f"{node.op_type}_{index}"


def find_bn_nodes(model: onnx.ModelProto, name: str) -> tuple[list[BNNode], list[SkippedLayer]]:
    """The recalibratable BN nodes of ``model``'s top graph, and those left alone with why.

    Raises:
        InvalidModelError: a BN node inside a subgraph (``If``/``Loop``/``Scan`` body), which
            cannot be measured batch by batch, named.
        NoBatchNormError: no BN node (with :data:`FOLDED_ADVICE`) or none recalibratable.
    """
    graph = model.graph
    for node, where in walk_nodes(graph):
        if where and node.op_type == BN_OP and node.domain in ("", "ai.onnx"):
            raise InvalidModelError(
                f"{name}: BatchNormalization node {node.name!r} lies{where}; BN nodes inside "
                "control-flow subgraphs cannot be recalibrated: export the model without the "
                "If/Loop around them"
            )
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {out: index for index, node in enumerate(graph.node) for out in node.output}
    found: list[BNNode] = []
    skipped: list[SkippedLayer] = []
    for index, node in enumerate(graph.node):
        if node.op_type != BN_OP or node.domain not in ("", "ai.onnx"):
            continue
        label = node_name(node, index)
        mean = _stat_slot(graph, initializers, producers, index, 3)
        var = _stat_slot(graph, initializers, producers, index, 4)
        if mean is None or var is None:
            reason = "running mean/variance are computed in the graph, not stored"
            skipped.append(SkippedLayer(name=label, type=BN_OP, reason=reason))
            continue
        if any(out for out in node.output[1:]):
            reason = "training-mode outputs (running statistics) are used by the graph"
            skipped.append(SkippedLayer(name=label, type=BN_OP, reason=reason))
            continue
        mean_values = numpy_helper.to_array(initializers[mean.initializer])
        var_values = numpy_helper.to_array(initializers[var.initializer])
        if mean_values.ndim != 1 or mean_values.shape != var_values.shape:
            reason = f"running mean/variance of shapes {mean_values.shape}, {var_values.shape}"
            skipped.append(SkippedLayer(name=label, type=BN_OP, reason=reason))
            continue
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        found.append(
            BNNode(
                index, label, node.input[0], node.output[0], len(mean_values), epsilon, mean, var
            )
        )
    if not found:
        if skipped:
            raise NoBatchNormError(
                f"{name}: no BatchNormalization node whose statistics can be re-estimated "
                f"({len(skipped)} skipped: {skipped[0].name}: {skipped[0].reason})"
            )
        raise NoBatchNormError(
            f"{name}: the ONNX model has no BatchNormalization node: {FOLDED_ADVICE}"
        )
    return found, skipped


def _stat_slot(
    graph: onnx.GraphProto,
    initializers: dict[str, onnx.TensorProto],
    producers: dict[str, int],
    node_index: int,
    input_index: int,
) -> StatSlot | None:
    """Follow input ``input_index`` of node ``node_index`` through ``Identity`` nodes to an
    initializer; None where the value is computed (or is a graph input without a default)."""
    for _ in range(len(graph.node) + 1):  # bounded: a chain visits each node once
        node = graph.node[node_index]
        if len(node.input) <= input_index:
            return None
        value = node.input[input_index]
        if value in initializers:
            return StatSlot(value, node_index, input_index)
        producer = producers.get(value)
        if producer is None or graph.node[producer].op_type != "Identity":
            return None
        node_index, input_index = producer, 0
    return None


@dataclass(frozen=True)
class StatOutputs:
    """The graph output names of one BN node's batch statistics in the rewritten graph."""

    mean: str
    var: str
    size: str


def statistics_graph(
    model: onnx.ModelProto, nodes: list[BNNode], *, training_bn: bool = False
) -> tuple[onnx.ModelProto, list[StatOutputs]]:
    """A copy of ``model`` whose ``nodes`` normalize with batch statistics and expose them as
    graph outputs (see the module docstring); the original outputs stay outputs too.

    ``training_bn``: the session's execution provider runs training-mode ``BatchNormalization``
    (ONNX Runtime's CPU provider does; its CUDA provider does not): a float32/float64 node of an
    opset ≥ 14 graph then becomes that node in training mode with momentum 0, one fused kernel
    whose running-statistics outputs are the batch's mean and biased variance (ONNX Runtime
    centres before squaring: as accurate as the two-pass rewrite). Other nodes, and every node
    without it, take the ``ReduceMean`` rewrite."""
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    prefix = _unused_prefix(model)
    opset = default_opset(model)
    elem_types = _value_types(model)
    by_index = {bn.index: (k, bn) for k, bn in enumerate(nodes)}
    new_nodes: list[onnx.NodeProto] = []
    outputs: list[StatOutputs] = []
    for index, node in enumerate(model.graph.node):
        if index not in by_index:
            new_nodes.append(node)
            continue
        k, bn = by_index[index]
        rewrite = _BNRewrite(f"{prefix}bn{k}_", opset, elem_types, graph)
        fused = training_bn and opset >= TRAINING_BN_OPSET and rewrite.trains_in_place(node, bn)
        new_nodes.extend(rewrite.training_nodes(node, bn) if fused else rewrite.nodes(node, bn))
        outputs.append(rewrite.outputs)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return rewritten, outputs


def _unused_prefix(model: onnx.ModelProto) -> str:
    names = {v for node in model.graph.node for v in (*node.input, *node.output, node.name)}
    names |= {t.name for t in model.graph.initializer}
    prefix = "__recalib_"
    while any(name.startswith(prefix) for name in names):
        prefix = "_" + prefix
    return prefix


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value whose type is known (declared or inferred)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # typing is an optimisation here; unknown types fall back below
        inferred = model
    graph = inferred.graph
    types = {
        value.name: value.type.tensor_type.elem_type
        for value in (*graph.input, *graph.output, *graph.value_info)
        if value.type.HasField("tensor_type")
    }
    types.update({tensor.name: tensor.data_type for tensor in graph.initializer})
    return types


_MEASURED_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE}
TRAINING_BN_OPSET = 14
"""From this opset a training-mode BN's extra outputs are its running mean and variance."""


class _BNRewrite:
    """The nodes replacing one BN node (see the module docstring)."""

    def __init__(
        self, prefix: str, opset: int, elem_types: dict[str, int], graph: onnx.GraphProto
    ) -> None:
        self.prefix, self.opset, self.types, self.graph = prefix, opset, elem_types, graph
        self.built: list[onnx.NodeProto] = []
        self.outputs = StatOutputs(f"{prefix}mean", f"{prefix}var", f"{prefix}size")

    def _node(self, op: str, inputs: list[str], tag: str, **attributes: Any) -> str:
        out = f"{self.prefix}{tag}"
        self.built.append(helper.make_node(op, inputs, [out], name=out, **attributes))
        return out

    def _constant(self, tag: str, values: np.ndarray) -> str:
        name = f"{self.prefix}{tag}"
        self.graph.initializer.append(numpy_helper.from_array(values, name))
        return name

    def _reduce(self, op: str, value: str, tag: str) -> str:
        """``op`` over axes 0 and 2 of an (N, C, L) value, kept as (1, C, 1)."""
        if self.opset >= 18:  # axes became an input at opset 18
            axes = self._constant(f"{tag}_axes", np.array([0, 2], dtype=np.int64))
            return self._node(op, [value, axes], tag, keepdims=1)
        return self._node(op, [value], tag, axes=[0, 2], keepdims=1)

    def _flat(self, value: str, out: str) -> None:
        self.built.append(helper.make_node("Reshape", [value, self.flat_shape], [out], name=out))

    def trains_in_place(self, node: onnx.NodeProto, bn: BNNode) -> bool:
        """The node can measure itself in training mode: its input and stored statistics share a
        float32/float64 type (no cast), and nothing reads outputs other than its ``Y`` (training
        mode gives outputs 1 and 2 other meanings)."""
        x_type = self.types.get(bn.input, TensorProto.FLOAT)
        same_type = self.types.get(bn.mean.initializer, x_type) == x_type
        return x_type in _MEASURED_TYPES and same_type and not any(node.output[1:])

    def training_nodes(self, node: onnx.NodeProto, bn: BNNode) -> list[onnx.NodeProto]:
        """The node in training mode with momentum 0: its batch mean and biased variance as
        outputs 1 and 2 (ONNX Runtime's CPU kernel), and the input's element count."""
        compute = self.types.get(bn.input, TensorProto.FLOAT)
        train = onnx.NodeProto()
        train.CopyFrom(node)
        kept = [a for a in node.attribute if a.name not in ("training_mode", "momentum")]
        del train.attribute[:]
        train.attribute.extend(kept)
        train.attribute.extend(
            [helper.make_attribute("training_mode", 1), helper.make_attribute("momentum", 0.0)]
        )
        del train.output[1:]
        train.output.extend([self.outputs.mean, self.outputs.var])
        self.built.append(train)
        self._expose(bn, compute)
        return self.built

    def _expose(self, bn: BNNode, compute: int) -> None:
        """The input's element count, and the statistics as graph outputs."""
        self.built.append(
            helper.make_node("Size", [bn.input], [self.outputs.size], name=self.outputs.size)
        )
        self.graph.output.extend(
            [
                helper.make_tensor_value_info(self.outputs.mean, compute, [bn.channels]),
                helper.make_tensor_value_info(self.outputs.var, compute, [bn.channels]),
                helper.make_tensor_value_info(self.outputs.size, TensorProto.INT64, []),
            ]
        )

    def nodes(self, node: onnx.NodeProto, bn: BNNode) -> list[onnx.NodeProto]:
        """Batch mean and biased variance in two passes (mean, then the centred sum of squares:
        stable where E[x²] − E[x]² is not), then the BN node itself, unchanged but for its mean
        and variance inputs: ONNX Runtime's own BN kernel normalizes with the batch's."""
        x_type = self.types.get(bn.input, TensorProto.FLOAT)
        compute = x_type if x_type in _MEASURED_TYPES else TensorProto.FLOAT
        dtype = helper.tensor_dtype_to_np_dtype(compute)
        x = bn.input
        if x_type != compute:
            x = self._node("Cast", [x], "x_cast", to=compute)
        channels_shape = self._constant("ncl", np.array([0, bn.channels, -1], dtype=np.int64))
        self.flat_shape = self._constant("flat", np.array([-1], dtype=np.int64))
        x3 = self._node("Reshape", [x, channels_shape], "x3")
        mean3 = self._reduce("ReduceMean", x3, "mean3")
        centred = self._node("Sub", [x3, mean3], "centred")
        squares3 = self._reduce("ReduceSumSquare", centred, "squares3")
        elements = self._node("Cast", [self._node("Size", [x3], "x3_size")], "x3_count", to=compute)
        channels = self._constant("channels", np.array(bn.channels, dtype=dtype))
        per_channel = self._node("Div", [elements, channels], "per_channel")
        var3 = self._node("Div", [squares3, per_channel], "var3")
        self._flat(mean3, self.outputs.mean)
        self._flat(var3, self.outputs.var)
        stats_type = self.types.get(bn.mean.initializer, compute)
        mean, var = self.outputs.mean, self.outputs.var
        if stats_type != compute:
            mean = self._node("Cast", [mean], "mean_cast", to=stats_type)
            var = self._node("Cast", [var], "var_cast", to=stats_type)
        normalize = onnx.NodeProto()
        normalize.CopyFrom(node)
        normalize.input[3], normalize.input[4] = mean, var
        self._expose(bn, compute)
        self.built.append(normalize)
        return self.built


def write_statistics(
    model: onnx.ModelProto, nodes: list[BNNode], statistics: list[tuple[np.ndarray, np.ndarray]]
) -> onnx.ModelProto:
    """A copy of ``model`` with each node's running mean/var initializer holding ``statistics``
    (in the initializer's own dtype); nothing else changes.

    An initializer that something else reads too (torch's legacy exporter stores equal tensors
    once, behind ``Identity`` nodes) is not overwritten: the BN's slot gets an initializer of its
    own, ``<initializer>.<bn node>``, and only the reading node's input is re-pointed.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    readers: dict[str, int] = {}
    for node, _ in walk_nodes(graph):
        for value in node.input:
            readers[value] = readers.get(value, 0) + 1
    for output in graph.output:
        readers[output.name] = readers.get(output.name, 0) + 1
    for bn, (mean, var) in zip(nodes, statistics, strict=True):
        for slot, values in ((bn.mean, mean), (bn.var, var)):
            original = initializers[slot.initializer]
            array = np.asarray(values).astype(helper.tensor_dtype_to_np_dtype(original.data_type))
            if readers.get(slot.initializer, 0) == 1:
                replacement = numpy_helper.from_array(array, original.name)
                replacement.doc_string = original.doc_string
                original.CopyFrom(replacement)
                continue
            own = f"{slot.initializer}.{bn.name}"
            while own in initializers:
                own += "_"
            graph.initializer.append(numpy_helper.from_array(array, own))
            initializers[own] = graph.initializer[-1]
            graph.node[slot.node].input[slot.input] = own
    return result
