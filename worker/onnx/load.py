"""Reading an ONNX model file a tenant sent: every size bounded before it is allocated.

:func:`read_onnx` parses the protobuf (refusing files at or near protobuf's 2 GiB limit before
reading them), loads external data only from files inside the artifact's own folder (an
external-data ``location`` is a path-traversal surface), and refuses what ONNX Runtime would
otherwise allocate or run without bound: initializers whose declared shape does not match the
bytes stored, tensors whose declared or inferred static shape exceeds ``max_tensor_bytes``,
operators outside ONNX Runtime's standard domains, and opsets older than 9. Every refusal is an
:class:`~recalib.errors.InvalidModelError` naming the file and the node, tensor or path at fault.

This is the allowlist layer; the job's sandbox (memory rlimit, no network, confined files) is
the other one, so a graph that allocates at run time beyond what is seen statically stops there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import external_data_helper, helper

from recalib.errors import InvalidModelError

PROTOBUF_LIMIT_BYTES = 2 * 1024**3
"""Protobuf cannot serialize or parse a message of 2 GiB or more."""
MAX_MODEL_FILE_BYTES = PROTOBUF_LIMIT_BYTES - 64 * 1024**2
"""The largest ``.onnx`` file read: a margin below the protobuf limit (a file that close to it
cannot be written back with its new statistics)."""
MAX_TENSOR_BYTES = 4 * 1024**3
"""The largest tensor (initializer, graph input or inferred value) a model may declare."""
MIN_OPSET = 9
"""The oldest default-domain opset read (``BatchNormalization`` lost ``spatial`` at 9)."""
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
"""Operator domains ONNX Runtime's CPU build implements; any other is a custom op and refused."""


def read_onnx(
    path: Path | str,
    *,
    artifact_dir: Path | str | None = None,
    max_file_bytes: int = MAX_MODEL_FILE_BYTES,
    max_tensor_bytes: int = MAX_TENSOR_BYTES,
) -> onnx.ModelProto:
    """Parse and check the ONNX model at ``path``; external data loaded into the returned proto.

    Args:
        path: the ``.onnx`` file.
        artifact_dir: the folder the uploaded artifact occupies; external-data files must resolve
            inside it. ``None``: the model must carry all its data in the one file.
        max_file_bytes: the ``.onnx`` file and its external data together at most this.
        max_tensor_bytes: no declared or statically inferred tensor larger than this.

    Raises:
        InvalidModelError: anything in the module docstring, or a file protobuf cannot parse.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidModelError(f"{path.name}: cannot read the model file: {exc}") from exc
    if size > max_file_bytes:
        raise InvalidModelError(
            f"{path.name}: {size} bytes; ONNX files over {max_file_bytes} bytes are refused "
            "(protobuf's limit is 2 GiB): store the weights as external data in the same folder",
            file=str(path),
        )
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # the protobuf parser's errors have no common type
        raise InvalidModelError(
            f"{path.name}: not a readable ONNX model (protobuf ModelProto): {exc}", file=str(path)
        ) from exc
    _load_external_data(model, path, artifact_dir, max_file_bytes - size)
    check_model(model, path.name, max_tensor_bytes)
    return model


def check_model(
    model: onnx.ModelProto, name: str, max_tensor_bytes: int = MAX_TENSOR_BYTES
) -> None:
    """The static checks of :func:`read_onnx` on a parsed model (see the module docstring)."""
    if not model.HasField("graph") or not model.graph.node:
        raise InvalidModelError(f"{name}: an ONNX model without a graph (no nodes)")
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise InvalidModelError(
            f"{name}: opset {opset}; ONNX models of opset {MIN_OPSET} or newer are read: "
            "convert it with onnx.version_converter.convert_version(model, 13)"
        )
    functions = {(f.domain, f.name) for f in model.functions}
    for node, where in walk_nodes(model.graph):
        if node.domain not in STANDARD_DOMAINS and (node.domain, node.op_type) not in functions:
            domains = ", ".join(sorted(d or "ai.onnx" for d in STANDARD_DOMAINS))
            raise InvalidModelError(
                f"{name}: node {node.name or node.op_type!r}{where} is the custom operator "
                f"{node.domain}::{node.op_type}, which ONNX Runtime does not implement; only "
                f"the standard domains ({domains}) are run"
            )
    for function in model.functions:
        for node in function.node:
            if node.domain not in STANDARD_DOMAINS and (node.domain, node.op_type) not in functions:
                raise InvalidModelError(
                    f"{name}: function {function.name!r} uses the custom operator "
                    f"{node.domain}::{node.op_type}, which ONNX Runtime does not implement"
                )
    for tensor in model.graph.initializer:
        _check_initializer(tensor, name, max_tensor_bytes)
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        _check_declared(value, name, max_tensor_bytes, "declares")
    try:
        onnx.checker.check_model(model)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # the checker's and shape inference's errors have no common type
        raise InvalidModelError(f"{name}: an invalid ONNX graph: {exc}") from exc
    for value in inferred.graph.value_info:
        _check_declared(value, name, max_tensor_bytes, "would compute")


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default (``ai.onnx``) domain."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def walk_nodes(graph: onnx.GraphProto, where: str = "") -> Iterator[tuple[onnx.NodeProto, str]]:
    """Every node of ``graph`` and of its subgraphs (``If``/``Loop``/``Scan`` bodies), each with
    `` inside <op> '<name>'`` naming the nodes that hold it, innermost first ('' at the top)."""
    for node in graph.node:
        yield node, where
        for attribute in node.attribute:
            inner = f" inside {node.op_type} {node.name!r}{where}"
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from walk_nodes(attribute.g, inner)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from walk_nodes(subgraph, inner)


def tensor_bytes(dims: list[int], elem_type: int) -> int:
    """Bytes of a tensor of ``dims`` (Python ints: no overflow) and ONNX element type."""
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 8  # strings and unknown types: counted at 8 bytes a value
    numel = 1
    for dim in dims:
        numel *= max(int(dim), 0)
    return numel * itemsize


def _check_initializer(tensor: onnx.TensorProto, name: str, max_bytes: int) -> None:
    declared = tensor_bytes(list(tensor.dims), tensor.data_type)
    if declared > max_bytes:
        raise InvalidModelError(
            f"{name}: initializer {tensor.name!r} declares shape {list(tensor.dims)} "
            f"({declared} bytes); tensors over {max_bytes} bytes are refused"
        )
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type in (
        onnx.TensorProto.STRING,
        onnx.TensorProto.UNDEFINED,
    ):
        return
    numel = 1
    for dim in tensor.dims:
        numel *= dim
    stored = _stored_values(tensor)
    if stored != numel:
        raise InvalidModelError(
            f"{name}: initializer {tensor.name!r} declares shape {list(tensor.dims)} "
            f"({numel} values) but stores {stored}: a corrupt or tampered model"
        )


def _stored_values(tensor: onnx.TensorProto) -> int:
    """How many values ``tensor`` carries in its data fields (raw bytes counted by item size)."""
    if tensor.HasField("raw_data"):
        bits = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
        if tensor.data_type in bits:
            return len(tensor.raw_data) * 2
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        return len(tensor.raw_data) // itemsize
    fields = (
        tensor.float_data,
        tensor.int32_data,
        tensor.int64_data,
        tensor.double_data,
        tensor.uint64_data,
    )
    count = sum(len(values) for values in fields)
    if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        count //= 2
    return count


def _check_declared(value: onnx.ValueInfoProto, name: str, max_bytes: int, verb: str) -> None:
    if not value.type.HasField("tensor_type"):
        return
    tensor_type = value.type.tensor_type
    dims = [d.dim_value for d in tensor_type.shape.dim if d.HasField("dim_value")]
    if tensor_bytes(dims, tensor_type.elem_type) > max_bytes:
        shape = [
            d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor_type.shape.dim
        ]
        raise InvalidModelError(
            f"{name}: tensor {value.name!r} {verb} shape {shape}, over {max_bytes} bytes; "
            "tensors that large are refused"
        )


def _load_external_data(
    model: onnx.ModelProto, path: Path, artifact_dir: Path | str | None, budget_bytes: int
) -> None:
    """Read every external-data tensor from a file inside ``artifact_dir`` (:func:`read_onnx`)."""
    external = [
        tensor
        for tensor in external_data_helper._get_all_tensors(model)
        if external_data_helper.uses_external_data(tensor)
    ]
    if not external:
        return
    first = external_data_helper.ExternalDataInfo(external[0]).location
    if artifact_dir is None:
        raise InvalidModelError(
            f"{path.name}: tensor {external[0].name!r} stores its data in the external file "
            f"{first!r}; a single uploaded .onnx file must hold all its data (save it with "
            "onnx.save_model(model, path, save_as_external_data=False))",
            file=str(path),
        )
    root = Path(artifact_dir).resolve()
    total = 0
    for tensor in external:
        info = external_data_helper.ExternalDataInfo(tensor)
        target = (path.parent / info.location).resolve()
        if not target.is_relative_to(root) or os.path.isabs(info.location):
            raise InvalidModelError(
                f"{path.name}: tensor {tensor.name!r} names the external-data path "
                f"{info.location!r}, which lies outside the model's artifact: refused",
                file=str(path),
            )
        try:
            available = target.stat().st_size
        except OSError as exc:
            raise InvalidModelError(
                f"{path.name}: tensor {tensor.name!r}: cannot read its external data "
                f"{info.location!r}: {exc}",
                file=str(path),
            ) from exc
        offset = info.offset or 0
        length = info.length if info.length is not None else available - offset
        if offset < 0 or length < 0 or offset + length > available:
            raise InvalidModelError(
                f"{path.name}: tensor {tensor.name!r} reads bytes {offset}..{offset + length} of "
                f"{info.location!r}, which holds {available}",
                file=str(path),
            )
        total += length
    if total > budget_bytes:
        raise InvalidModelError(
            f"{path.name}: {total} bytes of external data; the model and its data together must "
            "stay under protobuf's 2 GiB limit to be written back",
            file=str(path),
        )
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise InvalidModelError(f"{path.name}: cannot load external data: {exc}") from exc
