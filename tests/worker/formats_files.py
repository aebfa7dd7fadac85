"""Helpers for the format tests: the digits model in every format, images, zip rewriting."""

from __future__ import annotations

import functools
import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

DIGITS_ARCH = "worker.digits:DigitsNet"
DIGITS_ALLOWLIST = ("worker.digits",)


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))


def write_model_files(model: nn.Module, example: torch.Tensor, out_dir: Path) -> dict[str, Path]:
    """The model as .pt2, scripted/traced TorchScript, safetensors, .pt state_dict, whole .pt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    paths = {
        "pt2": out_dir / "digits.pt2",
        "scripted": out_dir / "scripted.pt",
        "traced": out_dir / "traced.pt",
        "safetensors": out_dir / "digits.safetensors",
        "pt": out_dir / "digits_sd.pt",
        "checkpoint": out_dir / "checkpoint.pt",
        "module": out_dir / "whole.pt",
    }
    torch.export.save(export_program(model, example), paths["pt2"])
    torch.jit.save(torch.jit.script(model), str(paths["scripted"]))
    torch.jit.save(torch.jit.trace(model, example), str(paths["traced"]))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(paths["safetensors"]), metadata={"format": "pt", "note": "digits"})
    torch.save(state, paths["pt"])
    torch.save({"state_dict": state, "epoch": 7}, paths["checkpoint"])
    torch.save(model, paths["module"])
    return paths


def bn_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every running_mean/running_var buffer by name (TorchScript or eager)."""
    return {
        name: value.detach().clone()
        for name, value in module.named_buffers()
        if name.endswith(("running_mean", "running_var"))
    }


class Payload:
    """Unpickling this runs ``touch <marker>``: proof of code execution if the marker appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def rewrite_zip(src: Path, dst: Path, change: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy a zip member by member; ``change(name, data)`` returns new data (None: drop)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)
    return dst


@functools.cache
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Real data without training a model: the digits shifted to the target domain."""
    from worker.digits import load_digits_arrays, shift_domain

    inputs, labels = load_digits_arrays()
    return shift_domain(inputs, seed=1), labels


def png_bytes(array: np.ndarray) -> bytes:
    """An 8-bit grayscale (H×W) or RGB (H×W×3) array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def digit_pngs(inputs: np.ndarray, count: int) -> list[bytes]:
    """The first ``count`` digits (N×1×8×8 in [0, 1]) as 8×8 grayscale PNGs."""
    pixels = np.round(inputs[:count, 0] * 255).astype(np.uint8)
    return [png_bytes(p) for p in pixels]
