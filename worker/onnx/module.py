"""An ONNX model as an ``nn.Module``, so the job's evaluation runs it like any torch model.

:class:`OnnxModule` runs the graph in ONNX Runtime (CPU provider, as many intra-op threads as
torch has in the job's process: the job's ``threads``) and returns torch tensors: the output for
a one-output graph, a dict by output name otherwise. Its BN running statistics are buffers
(``bn<k>_mean``/``bn<k>_var``, one pair per BN node), so what reads or swaps a model's buffers
(:class:`worker.evaluation.ReferenceBuffers`, for the label-free output change) works on it;
the graph it runs always holds the buffers' current values (one session kept per set of values).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from recalib.errors import InvalidModelError
from worker.onnx.graph import BNNode, find_bn_nodes
from worker.onnx.session import feeds, graph_inputs, make_session, run_session

MAX_SESSIONS = 2
"""Sessions kept: the statistics before and after recalibration."""


class OnnxModule(nn.Module):
    """``proto`` run by ONNX Runtime (see the module docstring); ``name`` names it in errors."""

    def __init__(self, proto: onnx.ModelProto, name: str) -> None:
        super().__init__()
        self.name = name
        self.inputs = graph_inputs(proto)
        self.output_names = [value.name for value in proto.graph.output]
        self._sessions: OrderedDict[bytes, ort.InferenceSession] = OrderedDict()
        self.set_model(proto)

    def set_model(self, proto: onnx.ModelProto) -> None:
        """Run ``proto`` from now on; the buffers take its BN statistics."""
        self._proto = proto
        try:
            self.bn_nodes: list[BNNode] = find_bn_nodes(proto, self.name)[0]
        except InvalidModelError:  # no BN to hold as buffers: the job's checks say so
            self.bn_nodes = []
        stored = {tensor.name: tensor for tensor in proto.graph.initializer}
        for k, bn in enumerate(self.bn_nodes):
            for kind, slot in (("mean", bn.mean), ("var", bn.var)):
                values = torch.from_numpy(numpy_helper.to_array(stored[slot.initializer]).copy())
                self.register_buffer(f"bn{k}_{kind}", values)

    @property
    def proto(self) -> onnx.ModelProto:
        """The model with the buffers' current statistics."""
        current = self._statistics()
        if all(torch.equal(a, b) for a, b in zip(current, self._stored(), strict=True)):
            return self._proto
        proto = onnx.ModelProto()
        proto.CopyFrom(self._proto)
        stored = {tensor.name: tensor for tensor in proto.graph.initializer}
        slots = [slot for bn in self.bn_nodes for slot in (bn.mean, bn.var)]
        for slot, values in zip(slots, current, strict=True):
            tensor = stored[slot.initializer]
            tensor.CopyFrom(numpy_helper.from_array(values.numpy(), tensor.name))
        return proto

    def _statistics(self) -> list[torch.Tensor]:
        named = dict(self.named_buffers())
        return [
            named[f"bn{k}_{kind}"].detach().cpu()
            for k in range(len(self.bn_nodes))
            for kind in ("mean", "var")
        ]

    def _stored(self) -> list[torch.Tensor]:
        stored = {tensor.name: tensor for tensor in self._proto.graph.initializer}
        return [
            torch.from_numpy(numpy_helper.to_array(stored[slot.initializer]).copy())
            for bn in self.bn_nodes
            for slot in (bn.mean, bn.var)
        ]

    def _session(self) -> ort.InferenceSession:
        digest = hashlib.sha256()
        for values in self._statistics():
            digest.update(values.numpy().tobytes())
        key = digest.digest()
        session = self._sessions.get(key)
        if session is None:
            session = make_session(self.proto, self.name, threads=torch.get_num_threads())
            self._sessions[key] = session
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        self._sessions.move_to_end(key)
        return session

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs: Any = kwargs if kwargs else (args[0] if len(args) == 1 else args)
        batch = feeds(inputs, self.inputs, self.name)
        device = next(
            (v.device for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)),
            torch.device("cpu"),
        )
        outputs = run_session(self._session(), None, batch, self.name)
        tensors = [torch.from_numpy(out).to(device) for out in outputs]
        if len(tensors) == 1:
            return tensors[0]
        return dict(zip(self.output_names, tensors, strict=True))
