"""Model inputs of any structure: one tensor, several positional tensors, or named tensors.

A batch's *inputs* are a tensor, a tuple/list of tensors (positional arguments) or a dict of
tensors (keyword arguments), nested freely; every tensor leaf holds the same number of samples
along dimension 0. The engine merges, moves and counts inputs through these helpers, and calls the
model through a ``call_fn`` (:func:`call_model` by default), so any forward signature can be fed,
as torch's ``update_bn`` cannot (pytorch/pytorch#49082).

- ``input_fn(batch) -> inputs`` picks the inputs out of a loader's batch (:func:`batch_inputs`:
  a tensor as it is, ``(inputs, labels, ...)`` → ``inputs``, ``{"inputs": ...}`` → that value).
- ``call_fn(model, inputs) -> output`` runs the forward (:func:`call_model`: a tensor positionally,
  a tuple/list as positional arguments, a dict as keyword arguments).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from recalib.errors import InvalidDataError

Inputs = Any
"""A tensor, or a tuple/list/dict (nested) of tensors with one common batch dimension."""
InputFn = Callable[[Any], Inputs]
CallFn = Callable[[nn.Module, Inputs], Any]


def batch_inputs(batch: Any) -> Inputs:
    """The default ``input_fn``: a tensor, ``(inputs, ...)`` → ``inputs``, ``{"inputs": x}`` → x."""
    if isinstance(batch, dict):
        return batch.get("inputs")
    if isinstance(batch, list | tuple) and batch:
        return batch[0]
    return batch


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """The default ``call_fn``: ``model(x)``, ``model(*inputs)`` or ``model(**inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, list | tuple):
        return model(*inputs)
    return model(inputs)


def positional_call(model: nn.Module, inputs: Inputs) -> Any:
    """A ``call_fn`` passing a dict's values positionally, in order (``torch.export`` programs)."""
    if isinstance(inputs, dict):
        return model(*inputs.values())
    return call_model(model, inputs)


def leaves(value: Any) -> list[torch.Tensor]:
    """Every tensor in a nested tuple/list/dict structure, in order (other values are skipped)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in leaves(item)]
    if isinstance(value, list | tuple):
        return [leaf for item in value for leaf in leaves(item)]
    return []


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor leaf; named tuples keep their type."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: map_tensors(fn, item) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(fn, item) for item in value))
    if isinstance(value, list | tuple):
        return type(value)(map_tensors(fn, item) for item in value)
    return value


def move_batch(batch: Inputs, device: torch.device, *, channels_last: bool = False) -> Inputs:
    """Copy ``batch`` (a tensor, or a nested tuple/list/dict of tensors) to ``device``; on CUDA
    from pinned memory without blocking the host. ``channels_last``: 4-D tensors in that format."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device != device:
            if device.type == "cuda":
                pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
                tensor = pinned.to(device, non_blocking=True)
            else:
                tensor = tensor.to(device)
        if channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    return map_tensors(move, batch)


def check_inputs(inputs: Inputs) -> Inputs:
    """``inputs`` if it holds at least one tensor and all leaves share a batch dimension.

    Raises:
        InvalidDataError: no tensor, a scalar, or leaves with different sample counts.
    """
    found = leaves(inputs)
    if not found:
        raise InvalidDataError(
            "a calibration batch must be a tensor, an (inputs, ...) tuple or a dict with "
            f"'inputs' (inputs: a tensor, or a tuple/dict of tensors); got {type(inputs).__name__}"
        )
    if any(leaf.dim() == 0 for leaf in found):
        raise InvalidDataError("a calibration batch is a scalar; expected N×... inputs")
    sizes = {int(leaf.shape[0]) for leaf in found}
    if len(sizes) > 1:
        raise InvalidDataError(
            f"the inputs of one batch differ in their number of samples (dimension 0: "
            f"{sorted(sizes)}); every input needs one row per sample"
        )
    return inputs


def batch_size(inputs: Inputs) -> int:
    """Samples in ``inputs``: dimension 0 of its first tensor."""
    return int(leaves(inputs)[0].shape[0])


def concat(first: Inputs, second: Inputs) -> Inputs:
    """Two input batches of the same structure joined along the batch dimension."""
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    if isinstance(first, dict):
        return {key: concat(item, second[key]) for key, item in first.items()}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(concat(a, b) for a, b in zip(first, second, strict=True)))
    if isinstance(first, list | tuple):
        return type(first)(concat(a, b) for a, b in zip(first, second, strict=True))
    return first


def first_tensor(inputs: Inputs) -> torch.Tensor:
    """The first tensor leaf (device, dtype and shape checks use it)."""
    return leaves(inputs)[0]
