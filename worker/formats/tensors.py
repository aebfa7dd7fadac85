"""Tensor data files: ``.npz``, ``.safetensors`` and ``.pt`` with ``inputs`` and ``labels``.

``inputs``: a floating array (float16/bfloat16/float32/float64), N samples × at least one more
dimension, all values finite; batches come out as float32. Integer inputs are refused rather than
silently accepted: whether uint8 pixels mean [0, 255] or already-scaled values is a guess recalib
will not make (convert them yourself, e.g. ``x.astype(np.float32) / 255``). A model with several
inputs reads several such arrays, named by ``input_names`` (default the single ``inputs``), all
with the same N; batches then come out as a dict name → tensor, in that order.

``labels`` (optional): integers, one class id ≥ 0 per sample (N), or a segmentation mask per
sample (N×H×W class ids, H×W the size of the first input's last two dimensions; their values are
checked against the model's classes and ``ignore_index`` later). Other keys are ignored.

Nothing is unpickled: ``.npz`` members are read with ``allow_pickle=False`` (object arrays fail),
``.pt`` with ``torch.load(weights_only=True)`` (memory-mapped when possible). The finiteness check
walks the inputs in chunks, so it never holds a second full-size copy.

An ``.npz`` is a zip whose members inflate: before any array is allocated, the ``.npy`` header of
every member read is checked, its declared bytes (shape × itemsize) must fit in the member, stay
within ``max_archive_bytes`` together, and (over 1 MiB) not exceed ``MAX_RATIO``× the member's
compressed size, as for image archives (:mod:`worker.formats.archives`).
"""

from __future__ import annotations

import math
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recalib.errors import InvalidDataError, UnsafePickleError
from worker.formats.archives import MAX_RATIO, RATIO_FREE_BYTES
from worker.formats.pickle_safety import refused_global
from worker.formats.samples import DataLimits, SampleSet

_CHECK_CHUNK_ELEMENTS = 1 << 22
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class TensorSamples(SampleSet):
    """Samples held as input tensors (and ``labels``), indexed a batch at a time."""

    inputs: torch.Tensor = field(default_factory=lambda: torch.empty(0), repr=False)
    label_tensor: torch.Tensor | None = field(default=None, repr=False)
    named_inputs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def get_batch(self, indices: Any) -> tuple[Any, torch.Tensor]:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if len(self.named_inputs) > 1:
            inputs: Any = {k: v[index].to(torch.float32) for k, v in self.named_inputs.items()}
        else:
            inputs = self.inputs[index].to(torch.float32)
        return inputs, self.get_labels(index)

    def get_labels(self, indices: Any) -> torch.Tensor:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if self.label_tensor is None:
            return torch.full((len(index),), -1, dtype=torch.long)
        return self.label_tensor[index].to(torch.long)

    def labels(self) -> torch.Tensor | None:
        return None if self.label_tensor is None else self.label_tensor.to(torch.long)


def open_tensor_file(
    path: Path,
    kind: str,
    input_names: Sequence[str] = ("inputs",),
    limits: DataLimits | None = None,
) -> TensorSamples:
    """Read and validate a tensor file (``kind``: ``npz``, ``safetensors`` or ``pt``); an
    ``.npz``'s arrays are bounded by ``limits.max_archive_bytes`` (default: the CLI's)."""
    wanted = (*input_names, "labels")
    if kind == "npz":
        arrays = _read_npz(path, wanted, limits or DataLimits())
    else:
        arrays = {"safetensors": _read_safetensors, "pt": _read_pt}[kind](path, wanted)
    named = {
        name: _check_inputs(arrays.get(name), path, sorted(arrays), name, input_names)
        for name in input_names
    }
    first = named[input_names[0]]
    for name, tensor in named.items():
        if len(tensor) != len(first):
            raise InvalidDataError(
                f"{path.name}: input {name!r} holds {len(tensor)} samples and "
                f"{input_names[0]!r} {len(first)}; every input needs one row per sample",
                file=str(path),
            )
    labels = arrays.get("labels")
    label_tensor = None if labels is None else _check_labels(labels, first, path)
    return TensorSamples(
        path=path,
        has_labels=label_tensor is not None,
        num_samples=len(first),
        sample_shape=tuple(first.shape[1:]),
        label_shape=() if label_tensor is None else tuple(label_tensor.shape[1:]),
        input_names=tuple(input_names),
        inputs=first,
        label_tensor=label_tensor,
        named_inputs=named,
    )


def _read_npz(path: Path, wanted: Sequence[str], limits: DataLimits) -> dict[str, torch.Tensor]:
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            declared = 0
            for key, info in members.items():
                if key in wanted:
                    declared += _declared_bytes(archive, info, key, path, limits, declared)
            arrays: dict[str, torch.Tensor] = {}
            for key, info in members.items():
                if key not in wanted:
                    arrays[key] = torch.empty(0)  # listed in messages only
                    continue
                with archive.open(info) as stream:
                    array = np.lib.format.read_array(stream, allow_pickle=False)
                arrays[key] = _from_numpy(array, path, key)
    except InvalidDataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise InvalidDataError(f"{path.name}: unreadable .npz: {exc}", file=str(path)) from exc
    return arrays


def _declared_bytes(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    key: str,
    path: Path,
    limits: DataLimits,
    before: int,
) -> int:
    """The bytes ``info``'s ``.npy`` header declares (shape × itemsize), read from its header
    alone and refused when they could not be honoured (see the module docstring)."""
    with archive.open(info) as stream:
        version = np.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise InvalidDataError(
                f"{path.name}: {key}.npy is in .npy format {version[0]}.{version[1]}, which "
                "recalib does not read; save plain numeric arrays with np.savez",
                file=str(path),
            )
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }[version]
        shape, _, dtype = read_header(stream)
    if dtype.hasobject:
        raise InvalidDataError(
            f"{path.name} holds object arrays (pickled Python objects), which recalib never "
            "unpickles; save numeric arrays (np.savez(file, inputs=..., labels=...))",
            file=str(path),
        )
    size = math.prod(shape) * dtype.itemsize
    what = f"{path.name}: {key}.npy declares {size} bytes (shape {tuple(shape)}, {dtype})"
    if before + size > limits.max_archive_bytes:
        raise InvalidDataError(
            f"{what}; the arrays read from one data file may hold at most "
            f"{limits.max_archive_bytes} bytes together (max_archive_bytes, "
            "RECALIB_MAX_ARCHIVE_BYTES): use fewer samples or raise the limit",
            file=str(path),
        )
    if size > info.file_size:
        raise InvalidDataError(
            f"{what}, more than the {info.file_size} bytes the member holds (corrupt or forged "
            "header)",
            file=str(path),
        )
    if size > RATIO_FREE_BYTES and size > MAX_RATIO * info.compress_size:
        raise InvalidDataError(
            f"{what}, over {MAX_RATIO}× its {info.compress_size} compressed bytes "
            "(compression bomb?)",
            file=str(path),
        )
    return size


def _from_numpy(array: np.ndarray, path: Path, key: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.ascontiguousarray(array))
    except TypeError as exc:
        raise InvalidDataError(
            f"{path.name}: {key} has unsupported dtype {array.dtype}", file=str(path)
        ) from exc


def _read_safetensors(path: Path, wanted: Sequence[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())  # a safe_open handle is not iterable
            return {k: handle.get_tensor(k) if k in wanted else torch.empty(0) for k in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InvalidDataError(
            f"{path.name}: not a readable safetensors file (corrupt or truncated?): {exc}",
            file=str(path),
        ) from exc


def _read_pt(path: Path, wanted: Sequence[str]) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as exc:
        found = refused_global(exc)
        raise UnsafePickleError(
            f"{path.name} holds Python objects beyond tensors"
            f"{f' (it references {found})' if found else ''}; data files are never unpickled: "
            "save a dict of tensors, torch.save({'inputs': x, 'labels': y}, path)",
            file=str(path),
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InvalidDataError(
            f"{path.name}: not a readable torch.save file (corrupt or truncated?)", file=str(path)
        ) from exc
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InvalidDataError(
            f"{path.name} must hold a dict of tensors {{'inputs': ..., 'labels': ...}}, "
            f"found {type(obj).__name__}",
            file=str(path),
        )
    return {str(k): v for k, v in obj.items()}


def _check_inputs(
    inputs: torch.Tensor | None, path: Path, keys: list[str], key: str, names: Sequence[str]
) -> torch.Tensor:
    name = path.name
    if inputs is None:
        named = (
            ""
            if tuple(names) == ("inputs",)
            else f", which options.input_names {list(names)} lists"
        )
        raise InvalidDataError(
            f"{name} has no {key!r} array{named} (found: {keys})", file=str(path)
        )
    what = "inputs" if key == "inputs" else f"input {key!r}"
    if inputs.ndim < 2:
        raise InvalidDataError(
            f"{name}: {what} must be N samples × features (at least 2 dimensions), got shape "
            f"{tuple(inputs.shape)}",
            file=str(path),
        )
    if len(inputs) == 0:
        raise InvalidDataError(f"{name}: {what} hold zero samples", file=str(path))
    if inputs.dtype not in _FLOATS:
        raise InvalidDataError(
            f"{name}: {what} are {str(inputs.dtype).removeprefix('torch.')}, not floating point; "
            "convert and scale them yourself (e.g. uint8 pixels to float32 / 255)",
            file=str(path),
        )
    bad = _first_non_finite(inputs)
    if bad is not None:
        raise InvalidDataError(
            f"{name}: {what} hold NaN or infinite values (first in sample {bad})", file=str(path)
        )
    return inputs


def _first_non_finite(inputs: torch.Tensor) -> int | None:
    flat = inputs.reshape(len(inputs), -1)
    step = max(1, _CHECK_CHUNK_ELEMENTS // max(1, flat.shape[1]))
    for start in range(0, len(flat), step):
        finite = torch.isfinite(flat[start : start + step]).all(dim=1)
        if not bool(finite.all()):
            return start + int((~finite).nonzero()[0])
    return None


def _check_labels(labels: torch.Tensor, inputs: torch.Tensor, path: Path) -> torch.Tensor:
    name, n = path.name, len(inputs)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise InvalidDataError(
            f"{name}: labels must be integers (class indices), got "
            f"{str(labels.dtype).removeprefix('torch.')}",
            file=str(path),
        )
    if labels.ndim == 3 and len(labels) == n:
        return _check_masks(labels, inputs, path)
    if labels.ndim != 1 or len(labels) != n:
        raise InvalidDataError(
            f"{name}: labels must be one integer per sample, shape ({n},); got "
            f"{tuple(labels.shape)} (segmentation masks: one H×W mask per sample, N×H×W)",
            file=str(path),
        )
    labels = labels.to(torch.long)
    if bool((labels < 0).any()):
        i = int((labels < 0).nonzero()[0])
        raise InvalidDataError(
            f"{name}: labels must be ≥ 0; sample {i} has label {int(labels[i])}", file=str(path)
        )
    return labels


def _check_masks(masks: torch.Tensor, inputs: torch.Tensor, path: Path) -> torch.Tensor:
    """Segmentation masks N×H×W: H×W must be the inputs' last two dimensions."""
    if inputs.ndim >= 3 and tuple(masks.shape[1:]) != tuple(inputs.shape[-2:]):
        raise InvalidDataError(
            f"{path.name}: the masks (labels) are {masks.shape[1]}×{masks.shape[2]} pixels but "
            f"the inputs are {inputs.shape[-2]}×{inputs.shape[-1]} (shape "
            f"{tuple(inputs.shape)}); every mask must have its image's size",
            file=str(path),
        )
    return masks  # kept in its integer type (uint8 masks stay small), widened per batch
