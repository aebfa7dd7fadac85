"""ONNX out: the recalibrated torch model written as ``<stem>.recalibrated.onnx`` and checked.

:func:`export_onnx` exports with torch's current exporter (``torch.onnx.export(dynamo=True,
optimize=False)``: BN nodes kept, the batch dimension dynamic, weights inside the one file), or
with the TorchScript-based exporter for a TorchScript model (``torch.export`` cannot trace one;
BN kept with ``do_constant_folding=False``). The file is then run in ONNX Runtime on an
evaluation batch and compared with the torch model's outputs: a difference over
``tolerance × max(1, max |output|)`` fails the job, naming both numbers.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from recalib import defaults
from recalib.contract import Artifact, ExportReport
from recalib.errors import InvalidModelError
from worker.engine.inputs import leaves
from worker.formats.models import artifact
from worker.onnx.session import make_session, run_session

logger = logging.getLogger(__name__)


def export_onnx(
    module: nn.Module,
    example: Any,
    out_path: Path,
    *,
    tolerance: float = defaults.ONNX_EXPORT_TOLERANCE,
) -> ExportReport:
    """Write ``module`` (eval mode, CPU) to ``out_path`` as ONNX and check it on ``example``
    (one evaluation batch: a tensor, a tuple of tensors, or a dict of named tensors).

    Raises:
        InvalidModelError: the exporter fails on the model, or ONNX Runtime's outputs differ
            from torch's by more than the tolerance.
    """
    module = module.eval()
    args, kwargs = _arguments(example)
    partial = out_path.with_name(f".partial-{out_path.name}")
    try:
        _export(module, args, kwargs, partial)
        proto = onnx.load_model(str(partial))
        names = [value.name for value in proto.graph.input]
        with torch.no_grad():
            expected = [t.detach().float().numpy() for t in leaves(module(*args, **kwargs))]
        values = [*args, *kwargs.values()]
        batch = {name: value.numpy() for name, value in zip(names, values, strict=False)}
        got = run_session(make_session(proto, out_path.name), None, batch, out_path.name)
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    diff, scale = _max_diff(expected, got), max([1.0, *(float(np.abs(e).max()) for e in expected)])
    limit = tolerance * scale
    if diff > limit:
        out_path.unlink(missing_ok=True)
        raise InvalidModelError(
            f"the ONNX export of the recalibrated model differs from it by {diff:.3g} on an "
            f"evaluation batch (more than {limit:.3g} = {tolerance:g} × {scale:.3g}): the "
            "exporter changed what the model computes; drop options.export"
        )
    return ExportReport(artifact=_onnx_artifact(out_path), max_abs_diff=diff, tolerance=limit)


def _onnx_artifact(path: Path) -> Artifact:
    return artifact(path, "onnx")


def _arguments(example: Any) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    if isinstance(example, dict):
        return (), {k: v.cpu() for k, v in example.items()}
    if isinstance(example, list | tuple):
        return tuple(v.cpu() for v in example), {}
    return (example.cpu(),), {}


def _export(module: nn.Module, args: tuple, kwargs: dict[str, torch.Tensor], path: Path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
            if isinstance(module, torch.jit.ScriptModule):
                torch.onnx.export(
                    module, args, str(path), dynamo=False, do_constant_folding=False,
                    input_names=[f"input_{i}" for i in range(len(args))],
                    dynamic_axes={f"input_{i}": {0: "batch"} for i in range(len(args))},
                )  # fmt: skip
                return
            batch = torch.export.Dim("batch", min=2)
            shapes: Any = (
                {name: {0: batch} for name in kwargs} if kwargs else tuple({0: batch} for _ in args)
            )
            torch.onnx.export(
                module, args, str(path), kwargs=kwargs or None, dynamo=True, optimize=False,
                dynamic_shapes=shapes, external_data=False, verbose=False, report=False,
            )  # fmt: skip
    except Exception as exc:  # the exporters' errors share no base class
        first = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(
            f"torch.onnx cannot export the recalibrated model: {first}; drop options.export"
        ) from exc


def _max_diff(expected: list[np.ndarray], got: list[np.ndarray]) -> float:
    if len(expected) != len(got):
        raise InvalidModelError(
            f"the ONNX export has {len(got)} outputs and the model {len(expected)}"
        )
    return max(
        (float(np.abs(e - g.astype(np.float32)).max()) for e, g in zip(expected, got, strict=True)),
        default=0.0,
    )
