"""Device selection and host→device batch transfer."""

from __future__ import annotations

import re
from typing import Any

import torch

from recalib import defaults
from recalib.errors import InvalidOptionError

_DEVICE_PATTERN = re.compile(defaults.DEVICE_PATTERN)


def resolve_device(option: str) -> torch.device:
    """The device for an ``options.device`` value.

    ``auto`` is CUDA when available, else CPU. ``cuda``/``cuda:N``/``mps`` must be available.

    Raises:
        InvalidOptionError: the value is malformed or names a device this machine lacks.
    """
    if not _DEVICE_PATTERN.match(option):
        raise InvalidOptionError(
            f"device {option!r} is not one of auto, cpu, cuda, cuda:N, mps", field="options.device"
        )
    if option == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(option)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidOptionError(
                f"device {option!r} requested but CUDA is not available here; use auto or cpu",
                field="options.device",
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidOptionError(
                f"device {option!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)",
                field="options.device",
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidOptionError("device 'mps' is not available here", field="options.device")
    return device


def describe_device(device: torch.device) -> str:
    """A human-readable device name for reports, e.g. ``cuda:0 (NVIDIA H100)`` or ``cpu``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def move_batch(batch: Any, device: torch.device) -> Any:
    """Copy a batch (a tensor, or a tuple/list/dict of tensors) to ``device``; on CUDA from
    pinned memory without blocking the host."""
    if isinstance(batch, dict):
        return {key: move_batch(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_batch(value, device) for value in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(move_batch(value, device) for value in batch)
    if not isinstance(batch, torch.Tensor) or batch.device == device:
        return batch
    if device.type == "cuda":
        if not batch.is_pinned():
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)
    return batch.to(device)
