"""ONNX Runtime sessions for a tenant's model, and the feeds of one batch.

A session runs on the CPU execution provider with the job's thread count (``intra_op`` threads,
one ``inter_op`` thread, sequential execution), so it fits the job's confinement: no thread pool
larger than the job was given. Batches arrive as the torch tensors of the data readers
(:mod:`worker.formats.data`) and are fed by graph input name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from recalib.errors import InvalidDataError, InvalidModelError

CPU_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class GraphInput:
    """A graph input that is not an initializer: its name, numpy dtype and fixed batch size."""

    name: str
    dtype: np.dtype
    batch: int | None


def graph_inputs(model: onnx.ModelProto) -> list[GraphInput]:
    """The inputs a caller feeds (an IR < 4 graph also lists its initializers as inputs)."""
    stored = {tensor.name for tensor in model.graph.initializer}
    found = []
    for value in model.graph.input:
        if value.name in stored:
            continue
        tensor_type = value.type.tensor_type
        dims = tensor_type.shape.dim
        batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, TypeError, ValueError):
            dtype = np.dtype(np.float32)
        found.append(GraphInput(value.name, dtype, batch or None))
    return found


def batch_size_range(inputs: list[GraphInput]) -> tuple[int, int | None]:
    """Samples per run the graph takes: ``(N, N)`` when an input fixes its batch dimension to N."""
    fixed = {spec.batch for spec in inputs if spec.batch is not None}
    if len(fixed) == 1:
        size = fixed.pop()
        return size, size
    return 1, None


def make_session(
    model: onnx.ModelProto | bytes, name: str, *, threads: int | None = None
) -> ort.InferenceSession:
    """A CPU session of ``model``; ``threads`` intra-op threads (None: ONNX Runtime's default).

    Raises:
        InvalidModelError: ONNX Runtime refuses the graph (an operator it lacks, bad types).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: ORT's warnings go to stderr, not our logs
    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, options, providers=[CPU_PROVIDER])
    except Exception as exc:  # ORT's pybind errors share no importable base class
        raise InvalidModelError(f"{name}: ONNX Runtime cannot load the model: {exc}") from exc


def feeds(inputs: Any, specs: list[GraphInput], name: str) -> dict[str, np.ndarray]:
    """One batch's inputs as ONNX Runtime feeds: a tensor for a one-input graph, a tuple/list in
    graph input order, a dict by input name; each cast to its input's dtype."""
    names = [spec.name for spec in specs]
    if isinstance(inputs, torch.Tensor):
        if len(specs) != 1:
            raise InvalidDataError(
                f"{name} takes {len(specs)} inputs ({', '.join(names)}) and the data holds one "
                "array: store one array per input, named as the model's inputs (input_names)"
            )
        values = {names[0]: inputs}
    elif isinstance(inputs, list | tuple):
        if len(inputs) != len(specs):
            raise InvalidDataError(
                f"{name} takes {len(specs)} inputs ({', '.join(names)}), the data holds "
                f"{len(inputs)}"
            )
        values = dict(zip(names, inputs, strict=True))
    elif isinstance(inputs, dict):
        missing = [n for n in names if n not in inputs]
        extra = [k for k in inputs if k not in names]
        if missing or extra:
            raise InvalidDataError(
                f"{name} takes the inputs {', '.join(names)}; the data's arrays are "
                f"{', '.join(map(str, inputs))} (missing: {', '.join(missing) or 'none'}, "
                f"unknown: {', '.join(map(str, extra)) or 'none'})"
            )
        values = {n: inputs[n] for n in names}
    else:
        raise InvalidDataError(f"{name}: a batch of {type(inputs).__name__}, not tensors")
    result = {}
    for spec in specs:
        value = values[spec.name]
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        result[spec.name] = np.ascontiguousarray(array, dtype=spec.dtype)
    return result


def run_session(
    session: ort.InferenceSession,
    output_names: list[str] | None,
    batch: dict[str, np.ndarray],
    name: str,
) -> list[np.ndarray]:
    """``session.run``, ONNX Runtime's failures as user errors: a batch the graph does not take
    is :class:`InvalidDataError`, a graph that fails to run :class:`InvalidModelError`."""
    try:
        return session.run(output_names, batch)
    except Exception as exc:  # ORT's pybind errors share no importable base class
        message = str(exc)
        if "INVALID_ARGUMENT" in message or type(exc).__name__ == "InvalidArgument":
            raise InvalidDataError(f"{name} does not take this batch: {message}") from exc
        if "bad_alloc" in message or "allocate" in message.lower():
            raise InvalidModelError(
                f"{name}: ONNX Runtime ran out of memory running the graph (more than the job's "
                f"memory limit): {message}"
            ) from exc
        raise InvalidModelError(
            f"{name}: ONNX Runtime failed running the graph: {message}"
        ) from exc
