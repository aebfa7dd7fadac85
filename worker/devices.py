"""Device selection: the device an option names, a device's name, the device a model sits on.

Moving batches there: :func:`worker.engine.inputs.move_batch`.
"""

from __future__ import annotations

import itertools
import re

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


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` sits: the device of its first parameter or buffer (CPU if it has none)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")
