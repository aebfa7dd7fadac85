"""A model's output of any structure: describing it, finding the logits in it, trimming it.

Outputs may be a tensor, a tuple, a named tuple (torchvision's ``GoogLeNetOutputs``), a dict
(torchvision segmentation's ``{"out": ..., "aux": ...}``), or nested (a detector's list of dicts).
``output_key`` names the logits in such a structure: a dict key, a tuple index or a named-tuple
field; dotted for nested outputs (``aux.0``). Without it, :func:`auto_logits` looks for them.
"""

from __future__ import annotations

from typing import Any

import torch

from recalib.errors import InvalidOptionError
from worker.engine.inputs import leaves, map_tensors

LOGIT_NAMES = ("out", "logits")
"""Keys and named-tuple fields taken as the logits without ``output_key`` (torchvision's)."""
_MAX_DESCRIBED = 8


def describe(output: Any, depth: int = 0) -> str:
    """A short description: ``tensor 2×10``, ``dict(out: 2×21×8×8, aux: ...)``, ``list[2]``."""
    if isinstance(output, torch.Tensor):
        return "×".join(str(size) for size in output.shape) or "scalar"
    if depth >= 2:
        return type(output).__name__
    if isinstance(output, dict):
        items = [f"{key}: {describe(value, depth + 1)}" for key, value in output.items()]
        return f"dict({_join(items)})"
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        items = [f"{name}: {describe(value, depth + 1)}" for name, value in _fields(output)]
        return f"{type(output).__name__}({_join(items)})"
    if isinstance(output, list | tuple):
        inner = describe(output[0], depth + 1) if output else ""
        return f"{type(output).__name__}[{len(output)}]" + (f" of {inner}" if inner else "")
    return type(output).__name__


def _join(items: list[str]) -> str:
    more = len(items) - _MAX_DESCRIBED
    return ", ".join(items[:_MAX_DESCRIBED]) + (f", … {more} more" if more > 0 else "")


def _fields(output: tuple) -> list[tuple[str, Any]]:
    return list(zip(output._fields, output, strict=True))  # type: ignore[attr-defined]


def keys(output: Any) -> list[str]:
    """The keys ``output_key`` may name at the top of ``output`` (nested ones dotted below)."""
    if isinstance(output, dict):
        return [str(key) for key in output]
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return list(output._fields)
    if isinstance(output, list | tuple):
        return [str(i) for i in range(len(output))]
    return []


def _child(output: Any, key: str) -> tuple[bool, Any]:
    if isinstance(output, dict):
        for name, value in output.items():
            if str(name) == key:
                return True, value
        return False, None
    if isinstance(output, tuple) and hasattr(output, "_fields") and key in output._fields:
        return True, getattr(output, key)
    if isinstance(output, list | tuple) and key.lstrip("-").isdigit():
        index = int(key)
        if -len(output) <= index < len(output):
            return True, output[index]
    return False, None


def select(output: Any, key: str) -> Any:
    """The part of ``output`` at ``key`` (a key, index or field; dotted for nesting).

    Raises:
        InvalidOptionError: naming ``options.output_key``, the keys that do exist.
    """
    found, value = _child(output, key)
    if found:
        return value
    current, walked = output, []
    for part in key.split("."):
        found, current = _child(current, part)
        if not found:
            break
        walked.append(part)
    else:
        return current
    at = ".".join(walked)
    where = f"at {at!r} " if walked else ""
    node = _walk(output, walked)
    available = keys(node)
    listing = (
        f"the keys there are {available}"
        if available
        else f"the output there is {describe(node)}, which has no keys"
    )
    raise InvalidOptionError(
        f"output_key {key!r} does not exist in the model's output {where}({describe(output)}): "
        f"{listing}",
        field="options.output_key",
    )


def _walk(output: Any, parts: list[str]) -> Any:
    for part in parts:
        output = _child(output, part)[1]
    return output


def auto_logits(output: Any) -> tuple[torch.Tensor | None, str | None]:
    """The logits of an output without ``output_key``, and the key they were found at.

    A tensor is itself; a dict or named tuple gives its ``out``/``logits`` entry, or its only
    entry when that is a tensor; a plain tuple or list its first item when that is a tensor.
    Otherwise none (an embedding beside other outputs is not taken for logits).
    """
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, dict) or (isinstance(output, tuple) and hasattr(output, "_fields")):
        named = keys(output)
        for name in LOGIT_NAMES:
            if name in named:
                value = select(output, name)
                if isinstance(value, torch.Tensor):
                    return value, name
        if len(named) == 1 and isinstance(select(output, named[0]), torch.Tensor):
            return select(output, named[0]), named[0]
        return None, None
    if isinstance(output, list | tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0], "0"
    return None, None


def pad_inputs(inputs: Any, min_batch_size: int) -> Any:
    """Every input tensor with its last sample repeated up to ``min_batch_size`` rows (eval mode
    only: there each sample's output is independent of the others, so padding changes nothing)."""

    def pad(tensor: torch.Tensor) -> torch.Tensor:
        missing = min_batch_size - tensor.shape[0]
        if missing <= 0 or tensor.shape[0] == 0:
            return tensor
        return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])

    return map_tensors(pad, inputs)


def trim_outputs(output: Any, padded: int, samples: int) -> Any:
    """``output`` with the rows of padding dropped: every tensor whose dimension 0 is ``padded``
    keeps its first ``samples`` rows (a list of per-sample outputs keeps its first ``samples``)."""
    if padded == samples:
        return output
    if isinstance(output, list) and len(output) == padded:
        return [trim_outputs(item, padded, samples) for item in output[:samples]]

    def trim(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() > 0 and tensor.shape[0] == padded:
            return tensor[:samples]
        return tensor

    return map_tensors(trim, output)


def float_leaves(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors of an output, in order (what an output change compares)."""
    return [leaf for leaf in leaves(output) if leaf.is_floating_point()]
